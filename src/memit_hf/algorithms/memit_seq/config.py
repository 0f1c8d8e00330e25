"""Hyperparameters of accumulated-key MEMIT."""

from dataclasses import dataclass
from typing import ClassVar

from ..memit.config import MEMITConfig


@dataclass
class MEMITSeqConfig(MEMITConfig):
    """Configuration of [`MEMITSeq`]: MEMIT whose preserved term includes the keys of every earlier edit, the
    sequential form used by ENCORE and others.

    Args:
        mom2_update_weight (`float`, *optional*):
            lambda, the weight of the preserved-key second moment (default per model, as for MEMIT).
    """

    name: ClassVar[str] = "memit_seq"
    implementation: ClassVar[str] = ".algorithm:MEMITSeq"
    paper: ClassVar[str] = "https://huggingface.co/papers/2210.07229"
