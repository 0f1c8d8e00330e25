"""MEMIT (Meng et al., https://huggingface.co/papers/2210.07229): batched least squares per layer."""

import torch

from ..base import EditAlgorithm, LayerProblem, check_preserved_term, cholesky_factor, preserved_term
from .config import MEMITConfig


class MEMIT(EditAlgorithm):
    """Delta = R K^T (lambda C + K K^T)^-1 (MEMIT Eq. 14), solved by Cholesky in float64.

    Returned as `B = R` and `A = ((lambda C + K K^T)^-1 K)^T`, the reference's `resid` and `adj` factors. Stateless:
    each edit is solved on its own (the model's current weights carry the earlier edits).
    """

    config_class = MEMITConfig

    def derive(self, statistics):
        check_preserved_term(statistics, self.config.mom2_update_weight)
        return None

    def preserved(self, problem: LayerProblem) -> torch.Tensor:
        """The preserved term of the system: `lambda C0`."""
        return preserved_term(problem.statistics, self.config.mom2_update_weight)

    def solve(self, problem: LayerProblem) -> tuple[torch.Tensor, torch.Tensor]:
        keys = problem.keys  # (n, d_in)
        system = self.preserved(problem) + keys.T @ keys  # (d_in, d_in)
        factor = cholesky_factor(system, f"lambda * C + K K^T of `{problem.module_name}`")
        adjusted = torch.cholesky_solve(keys.T, factor)  # (d_in, n)
        return problem.residuals.T.contiguous(), adjusted.T.contiguous()
