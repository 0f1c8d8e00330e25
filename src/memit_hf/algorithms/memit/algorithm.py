"""MEMIT (Meng et al., https://huggingface.co/papers/2210.07229): batched least squares per layer."""

import torch

from ..base import EditAlgorithm, LayerProblem, cholesky_factor
from .config import MEMITConfig


class MEMIT(EditAlgorithm):
    """Delta = R K^T (lambda C + K K^T)^-1 (MEMIT Eq. 14), solved by Cholesky in float64.

    Returned as `B = R` and `A = ((lambda C + K K^T)^-1 K)^T`, the reference's `resid` and `adj` factors. Stateless:
    each edit is solved on its own (the model's current weights carry the earlier edits).
    """

    config_class = MEMITConfig

    def derive(self, statistics):
        # Fail before any weight changes when even the preserved term cannot be factorised.
        cholesky_factor(
            self.config.mom2_update_weight * statistics.covariance(), f"lambda * C of `{statistics.module_name}`"
        )
        return None

    def solve(self, problem: LayerProblem) -> tuple[torch.Tensor, torch.Tensor]:
        keys = problem.keys  # (n, d_in)
        moment = problem.statistics.moment
        system = moment.total * (self.config.mom2_update_weight / moment.count) + keys.T @ keys  # (d_in, d_in)
        factor = cholesky_factor(system, f"lambda * C + K K^T of `{problem.module_name}`")
        adjusted = torch.cholesky_solve(keys.T, factor)  # (d_in, n)
        return problem.residuals.T.contiguous(), adjusted.T.contiguous()
