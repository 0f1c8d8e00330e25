"""MEMIT (Meng et al., https://huggingface.co/papers/2210.07229): batched least squares per layer."""

import torch

from .base import EditAlgorithm, cholesky_factor


class MEMIT(EditAlgorithm):
    """Delta = R K^T (lambda C + K K^T)^-1 (MEMIT Eq. 14), solved by Cholesky in float64.

    Returned as `B = R` and `A = ((lambda C + K K^T)^-1 K)^T`, the reference's `resid` and `adj` factors.
    """

    name = "memit"

    def solve(self, keys, residuals, covariance, mom2_update_weight):
        system = mom2_update_weight * covariance + keys.T @ keys  # (d_in, d_in)
        factor = cholesky_factor(system, "lambda * C + K K^T")
        adjusted = torch.cholesky_solve(keys.T, factor)  # (d_in, n)
        return residuals.T.contiguous(), adjusted.T.contiguous()
