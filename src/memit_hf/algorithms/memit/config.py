"""Hyperparameters of MEMIT."""

from dataclasses import dataclass, field
from typing import ClassVar

from ..config import AlgorithmConfig


@dataclass
class MEMITConfig(AlgorithmConfig):
    """Configuration of [`MEMIT`]: the least-squares update spread over several layers.

    Args:
        mom2_update_weight (`float`, *optional*):
            lambda, the weight of the preserved-key second moment against the new keys (MEMIT Eq. 14). `None` takes
            the per-model default (see [`~memit_hf.architectures.resolve_arguments`]).
    """

    name: ClassVar[str] = "memit"
    paper: ClassVar[str] = "https://huggingface.co/papers/2210.07229"

    mom2_update_weight: float | None = field(
        default=None, metadata={"help": "MEMIT lambda: weight of the preserved-key second moment (default per model)."}
    )

    def __post_init__(self):
        if self.mom2_update_weight is not None and not self.mom2_update_weight >= 0:
            raise ValueError(f"`mom2_update_weight` must be non-negative, got {self.mom2_update_weight}.")
