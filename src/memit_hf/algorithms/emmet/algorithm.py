"""EMMET (Gupta et al., https://huggingface.co/papers/2401.07453): `Delta = R (K^T C^-1 K + rho I)^-1 K^T C^-1`
with `C = lambda C0 (+ mu I) (+ sum_p K_p K_p^T)`, solved in float64."""

import torch

from ..base import EditAlgorithm, LayerProblem, cholesky_factor, equality_constrained_update, preserved_term
from .config import EMMETConfig


class EMMET(EditAlgorithm):
    """The equality-constrained batched update relaxed by a ridge `rho = emmet_ridge * mean(diag(K^T C^-1 K))` (or the
    absolute `rho = emmet_ridge` of the reference, with `emmet_ridge_relative=False`).

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
        config = self.config
        system = preserved_term(problem.statistics, config.mom2_update_weight, config.update_norm_weight)
        earlier = self.layer_state(problem.module_name).get("key_gram")
        if self.config.accumulate_keys and earlier is not None:
            system = system + earlier
        factor = cholesky_factor(system, f"C of `{problem.module_name}`")
        # The reference adds its absolute ridge only when the batch has more than one edit.
        ridge = config.emmet_ridge if config.emmet_ridge_relative or len(keys) > 1 else 0.0
        update = equality_constrained_update(keys, problem.residuals, factor, ridge, config.emmet_ridge_relative)
        if self.config.accumulate_keys:
            self.accumulate_gram(problem.module_name, "key_gram", keys)
        return update
