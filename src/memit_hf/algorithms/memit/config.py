"""Hyperparameters of MEMIT."""

from dataclasses import dataclass
from typing import ClassVar

from ..config import CovarianceConfig


@dataclass
class MEMITConfig(CovarianceConfig):
    """Configuration of [`MEMIT`]: the least-squares update spread over several layers.

    Args:
        mom2_update_weight (`float`, *optional*):
            lambda, the weight of the preserved-key second moment against the new keys (MEMIT Eq. 14). `None` takes
            the per-model default (see [`~memit_hf.defaults.resolve_arguments`]).
    """

    name: ClassVar[str] = "memit"
    implementation: ClassVar[str] = ".algorithm:MEMIT"
    paper: ClassVar[str] = "https://huggingface.co/papers/2210.07229"
