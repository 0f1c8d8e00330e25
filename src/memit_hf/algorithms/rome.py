"""ROME (Meng et al., https://huggingface.co/papers/2202.05262) as the single-layer equality-constrained update."""

import torch

from .base import EditAlgorithm, cholesky_factor


class ROME(EditAlgorithm):
    """Delta = R (K^T C^-1 K)^-1 K^T C^-1: the minimum-disturbance update (w.r.t. C) that writes every residual
    exactly. For one request this is ROME's rank-one update `r (C^-1 k)^T / (k^T C^-1 k)`; for several requests it is
    their joint equality-constrained solution (EMMET's form without its ridge). lambda cancels out.
    """

    name = "rome"

    def solve(self, keys, residuals, covariance, mom2_update_weight):
        factor = cholesky_factor(covariance, "C")
        c_inv_k = torch.cholesky_solve(keys.T, factor)  # (d_in, n)
        gram = keys @ c_inv_k  # (n, n) = K^T C^-1 K
        gram_factor = cholesky_factor(gram, "K^T C^-1 K (are two requests' keys identical?)")
        coefficients = torch.cholesky_solve(residuals, gram_factor)  # (n, d_out)
        return coefficients.T.contiguous(), c_inv_k.T.contiguous()

    def system_matrix(self, covariance, mom2_update_weight):
        return covariance
