"""ROME (Meng et al., https://huggingface.co/papers/2202.05262) as the single-layer equality-constrained update."""

import torch

from ..base import EditAlgorithm, LayerProblem, cholesky_factor, equality_constrained_update
from .config import ROMEConfig


class ROME(EditAlgorithm):
    """Delta = R (K^T C^-1 K)^-1 K^T C^-1: the minimum-disturbance update (w.r.t. C) that writes every residual
    exactly. For one request this is ROME's rank-one update `r (C^-1 k)^T / (k^T C^-1 k)`; for several requests it is
    their joint equality-constrained solution (EMMET's form without its ridge). The Cholesky factor of C is prepared
    once per statistics fingerprint.
    """

    config_class = ROMEConfig

    def derive(self, statistics):
        return cholesky_factor(statistics.covariance(), f"C of `{statistics.module_name}`")

    def solve(self, problem: LayerProblem) -> tuple[torch.Tensor, torch.Tensor]:
        return equality_constrained_update(problem.keys, problem.residuals, self.prepared(problem.module_name))
