"""The interface every algorithm implements, and the numerically careful factorisation they share."""

from abc import ABC, abstractmethod

import torch


class IllConditionedError(ValueError):
    """Raised when a system that must be positive definite is not (numerically)."""


def cholesky_factor(matrix: torch.Tensor, what: str) -> torch.Tensor:
    """Lower Cholesky factor of a symmetric positive definite float64 matrix.

    Raises:
        IllConditionedError: if the matrix has non-finite entries or is not numerically positive definite.
    """
    if not torch.isfinite(matrix).all():
        raise IllConditionedError(f"{what} has non-finite entries; the statistics or keys are corrupted.")
    factor, info = torch.linalg.cholesky_ex(matrix)
    # A pivot at roundoff level (squared pivot / largest diagonal entry below 1e-12) means numerically singular,
    # even when the factorisation itself does not fail.
    scale = matrix.diagonal().abs().max().clamp_min(torch.finfo(matrix.dtype).tiny)
    if int(info) != 0 or bool((factor.diagonal() ** 2 / scale).min() < 1e-12):
        raise IllConditionedError(
            f"{what} is not numerically positive definite: the system is ill-conditioned (duplicate requests or "
            "keys?). Collect statistics over more tokens (`stats_num_tokens`) or raise `mom2_update_weight`."
        )
    return factor


class EditAlgorithm(ABC):
    """Solves one layer's update from keys, residuals and the preserved-key covariance.

    Updates are returned as thin factors `(B, A)` with `Delta = B @ A`, `B` of shape `(d_out, n)` and `A` of shape
    `(n, d_in)`, so the update is exactly rank <= n and exports to a LoRA adapter without loss.
    """

    name: str

    @abstractmethod
    def solve(
        self, keys: torch.Tensor, residuals: torch.Tensor, covariance: torch.Tensor, mom2_update_weight: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Args:
            keys (`torch.Tensor`): `(n, d_in)` float64 keys K^T.
            residuals (`torch.Tensor`): `(n, d_out)` float64 residuals R^T this layer must write.
            covariance (`torch.Tensor`): `(d_in, d_in)` float64 E[k k^T].
            mom2_update_weight (`float`): lambda.

        Returns:
            `tuple[torch.Tensor, torch.Tensor]`: `B (d_out, n)` and `A (n, d_in)`, float64.
        """

    def check_covariance(self, covariance: torch.Tensor, mom2_update_weight: float, what: str) -> None:
        """Fail before any weight changes when the system this algorithm factorises cannot be solved."""
        cholesky_factor(self.system_matrix(covariance, mom2_update_weight), what)

    def system_matrix(self, covariance: torch.Tensor, mom2_update_weight: float) -> torch.Tensor:
        return mom2_update_weight * covariance
