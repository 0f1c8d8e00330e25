"""Hyperparameters of EMMET."""

from dataclasses import dataclass, field
from typing import ClassVar

from ..config import CovarianceConfig


@dataclass
class EMMETConfig(CovarianceConfig):
    """Configuration of [`EMMET`]: the batched equality-constrained update with a ridge.

    Args:
        mom2_update_weight (`float`, *optional*):
            lambda, the weight of the preserved-key second moment in `C = lambda C0 + sum_p K_p K_p^T` (default
            per model).
        emmet_ridge (`float`, *optional*, defaults to `0.1`):
            The ridge, relative to the mean diagonal of `K^T C^-1 K` (so it transfers between models and scales);
            0 writes every residual exactly (ROME's joint form).
        accumulate_keys (`bool`, *optional*, defaults to `True`):
            Add the Gram matrix of earlier edits' keys to the preserved term.
    """

    name: ClassVar[str] = "emmet"
    implementation: ClassVar[str] = ".algorithm:EMMET"
    paper: ClassVar[str] = "https://huggingface.co/papers/2401.07453"

    emmet_ridge: float = field(
        default=0.1, metadata={"help": "EMMET ridge, relative to the mean diagonal of K^T C^-1 K."}
    )
    accumulate_keys: bool = field(
        default=True, metadata={"help": "EMMET: add earlier edits' key Gram to the preserved term."}
    )

    def __post_init__(self):
        super().__post_init__()
        if not self.emmet_ridge >= 0:
            raise ValueError(f"`emmet_ridge` must be non-negative, got {self.emmet_ridge}.")
