"""EMMET (Gupta et al., https://huggingface.co/papers/2401.07453): `Delta = R (K^T C^-1 K + rho I)^-1 K^T C^-1`
with `C = lambda C0 (+ sum_p K_p K_p^T)`, solved in float64."""

import torch

from ..base import EditAlgorithm, LayerProblem, cholesky_factor, equality_constrained_update, preserved_term
from .config import EMMETConfig


class EMMET(EditAlgorithm):
    """The equality-constrained batched update relaxed by a ridge `rho = emmet_ridge * mean(diag(K^T C^-1 K))`.

    Returned as `B = R (K^T C^-1 K + rho I)^-1` and `A = (C^-1 K)^T`, so the update stays rank <= n.
    """

    config_class = EMMETConfig

    def derive(self, statistics):
        cholesky_factor(
            self.config.mom2_update_weight * statistics.covariance(), f"lambda * C of `{statistics.module_name}`"
        )
        return None

    def solve(self, problem: LayerProblem) -> tuple[torch.Tensor, torch.Tensor]:
        keys = problem.keys  # (n, d_in)
        system = preserved_term(problem.statistics, self.config.mom2_update_weight)  # (d_in, d_in)
        earlier = self.layer_state(problem.module_name).get("key_gram")
        if self.config.accumulate_keys and earlier is not None:
            system = system + earlier
        factor = cholesky_factor(system, f"C of `{problem.module_name}`")
        update = equality_constrained_update(keys, problem.residuals, factor, self.config.emmet_ridge)
        if self.config.accumulate_keys:
            self.accumulate_gram(problem.module_name, "key_gram", keys)
        return update
