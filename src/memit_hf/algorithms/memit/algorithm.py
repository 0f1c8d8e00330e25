"""MEMIT (Meng et al., https://huggingface.co/papers/2210.07229): batched least squares per layer."""

import torch

from ..base import EditAlgorithm, LayerProblem, cholesky_factor, preserved_term
from .config import MEMITConfig


MAX_CACHED_FACTOR_BYTES = 2**28
"""The largest Cholesky factor of `lambda C0` (float64, `d_in ** 2 * 8` bytes) that [`MEMIT`] keeps per layer for its
low-rank solve (d_in up to 5,792); larger layers solve the full system every time."""


def low_rank_solve(keys: torch.Tensor, factor: torch.Tensor, what: str) -> torch.Tensor:
    """`(lambda C + K K^T)^-1 K` from the Cholesky factor of `lambda C` alone, by the Woodbury identity:
    `(lambda C)^-1 K (I + K^T (lambda C)^-1 K)^-1`, an `(n, n)` system instead of a `(d_in, d_in)` one.

    Args:
        keys (`torch.Tensor`): `(n, d_in)` float64 keys `K^T`.
        factor (`torch.Tensor`): the lower Cholesky factor of `lambda C`, `(d_in, d_in)` float64.
        what (`str`): the system's name in errors.

    Returns:
        `torch.Tensor`: `(d_in, n)` float64.
    """
    spread = torch.cholesky_solve(keys.T, factor)  # (lambda C)^-1 K, (d_in, n)
    small = keys @ spread
    small = (small + small.T) / 2 + torch.eye(len(keys), dtype=small.dtype, device=small.device)
    return torch.cholesky_solve(spread.T, cholesky_factor(small, what)).T


class MEMIT(EditAlgorithm):
    """Delta = R K^T (lambda C + K K^T)^-1 (MEMIT Eq. 14), solved by Cholesky in float64.

    Returned as `B = R` and `A = ((lambda C + K K^T)^-1 K)^T`, the reference's `resid` and `adj` factors. Stateless:
    each edit is solved on its own (the model's current weights carry the earlier edits). The Cholesky factor of
    `lambda C` is computed once per statistics and kept (up to `MAX_CACHED_FACTOR_BYTES`): a batch of at most d_in / 4
    keys is then solved through it ([`low_rank_solve`], the same solution in exact arithmetic, equal to
    about 1e-12 relative in float64) instead of factorising `lambda C + K K^T`.
    """

    config_class = MEMITConfig

    def derive(self, statistics):
        """The lower Cholesky factor of `lambda C0` (None above `MAX_CACHED_FACTOR_BYTES`).

        Raises:
            IllConditionedError: when `lambda C0` cannot be factorised (before any weight changes).
        """
        term = preserved_term(statistics, self.config.mom2_update_weight)
        factor = cholesky_factor(term, f"lambda * C of `{statistics.module_name}`")
        return factor if factor.numel() * factor.element_size() <= MAX_CACHED_FACTOR_BYTES else None

    def preserved_factor(self, problem: LayerProblem) -> torch.Tensor | None:
        """The cached Cholesky factor of the preserved term, when it is `lambda C0` of `problem`'s statistics and
        [`prepare`] cached it (None for a subclass that overrides [`preserved`])."""
        if type(self).preserved is not MEMIT.preserved:
            return None
        return self.prepared_for(problem.statistics)

    def preserved(self, problem: LayerProblem) -> torch.Tensor:
        """The preserved term of the system: `lambda C0`."""
        return preserved_term(problem.statistics, self.config.mom2_update_weight)

    def solve(self, problem: LayerProblem) -> tuple[torch.Tensor, torch.Tensor]:
        keys = problem.keys  # (n, d_in)
        what = f"lambda * C + K K^T of `{problem.module_name}`"
        factor = self.preserved_factor(problem)
        if factor is not None and 4 * len(keys) <= keys.shape[1]:
            adjusted = low_rank_solve(keys, factor, what)
        else:
            system = self.preserved(problem) + keys.T @ keys  # (d_in, d_in)
            adjusted = torch.cholesky_solve(keys.T, cholesky_factor(system, what))  # (d_in, n)
        return problem.residuals.T.contiguous(), adjusted.T.contiguous()
