"""Accumulated-key MEMIT: `Delta = R K^T (lambda C0 + sum_p K_p K_p^T + K K^T)^-1`, keys and residuals computed on
the current (edited) model; the Gram matrix of the earlier keys is the method's constant-memory state."""

import torch

from ..base import LayerProblem, check_preserved_term, preserved_term
from ..memit.algorithm import MEMIT
from .config import MEMITSeqConfig


class MEMITSeq(MEMIT):
    """MEMIT that preserves the keys of earlier edits (state `key_gram` per layer, `sum_p K_p K_p^T`, float64), with
    ENCORE's norm constraint `mu I` when `update_norm_weight` is set."""

    config_class = MEMITSeqConfig

    def derive(self, statistics):
        """Nothing cached (the preserved term changes with every edit); `lambda C0` is checked."""
        check_preserved_term(statistics, self.config.mom2_update_weight)
        return None

    def preserved(self, problem: LayerProblem) -> torch.Tensor:
        """`lambda C0 (+ mu I) + sum_p K_p K_p^T`; stages this edit's keys for the next one."""
        term = preserved_term(problem.statistics, self.config.mom2_update_weight, self.config.update_norm_weight)
        earlier = self.layer_state(problem.module_name).get("key_gram")
        self.accumulate_gram(problem.module_name, "key_gram", problem.keys)
        return term if earlier is None else term + earlier
