"""Hyperparameters of EMMET."""

from dataclasses import dataclass, field
from typing import ClassVar

from ..config import CovarianceConfig, check_update_norm_weight, update_norm_field


PUBLISHED_EMMET = {"emmet_ridge": 0.1, "emmet_ridge_relative": False, "accumulate_keys": False}
"""The hyperparameters of the published EMMET (`hparams/EMMET/*.json`: `emmet_lambda` 0.1, absolute; no earlier keys
in the preserved term): `EditingArguments(algorithm="emmet", algorithm_config=PUBLISHED_EMMET)`."""


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
        emmet_ridge_relative (`bool`, *optional*, defaults to `True`):
            Read `emmet_ridge` relative to the mean diagonal of `K^T C^-1 K`; `False` takes it as the absolute ridge
            of the reference (`emmet_lambda`, added only when the batch has more than one edit).
        update_norm_weight (`float`, *optional*, defaults to `0.0`):
            mu, `mu I` added to `C` (the reference's `update_norm_lambda`).

    The published EMMET (scalable-model-editing/unified-model-editing, `emmet_main.py`) is `emmet_ridge=0.1`,
    `emmet_ridge_relative=False`, `accumulate_keys=False`. The defaults are more conservative (a ridge that follows
    the scale of `K^T C^-1 K`, and earlier keys preserved); see [`PUBLISHED_EMMET`].
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
    emmet_ridge_relative: bool = field(
        default=True, metadata={"help": "EMMET: read emmet_ridge relative to mean diag(K^T C^-1 K) (false: absolute)."}
    )
    update_norm_weight: float = update_norm_field()

    def __post_init__(self):
        super().__post_init__()
        check_update_norm_weight(self.update_norm_weight)
        if not self.emmet_ridge >= 0:
            raise ValueError(f"`emmet_ridge` must be non-negative, got {self.emmet_ridge}.")
