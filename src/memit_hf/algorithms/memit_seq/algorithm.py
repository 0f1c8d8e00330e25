"""Accumulated-key MEMIT: `Delta = R K^T (lambda C0 + sum_p K_p K_p^T + K K^T)^-1`, keys and residuals computed on
the current (edited) model; the Gram matrix of the earlier keys is the method's constant-memory state."""

import torch

from ..base import EditAlgorithm, LayerProblem, cholesky_factor
from .config import MEMITSeqConfig


class MEMITSeq(EditAlgorithm):
    """MEMIT that preserves the keys of earlier edits (state `key_gram` per layer, `sum_p K_p K_p^T`, float64)."""

    config_class = MEMITSeqConfig

    def derive(self, statistics):
        cholesky_factor(
            self.config.mom2_update_weight * statistics.covariance(), f"lambda * C of `{statistics.module_name}`"
        )
        return None

    def solve(self, problem: LayerProblem) -> tuple[torch.Tensor, torch.Tensor]:
        keys = problem.keys  # (n, d_in)
        moment = problem.statistics.moment
        system = moment.total * (self.config.mom2_update_weight / moment.count) + keys.T @ keys  # (d_in, d_in)
        earlier = self.layer_state(problem.module_name).get("key_gram")
        if earlier is not None:
            system = system + earlier
        factor = cholesky_factor(system, f"lambda * C + sum K_p K_p^T + K K^T of `{problem.module_name}`")
        adjusted = torch.cholesky_solve(keys.T, factor)  # (d_in, n)
        self.accumulate_gram(problem.module_name, "key_gram", keys)
        return problem.residuals.T.contiguous(), adjusted.T.contiguous()
