"""Hyperparameters of accumulated-key MEMIT."""

from dataclasses import dataclass
from typing import ClassVar

from ..config import check_update_norm_weight, update_norm_field
from ..memit.config import MEMITConfig


@dataclass
class MEMITSeqConfig(MEMITConfig):
    """Configuration of [`MEMITSeq`]: MEMIT whose preserved term includes the keys of every earlier edit, the
    sequential form used by ENCORE and others.

    Args:
        mom2_update_weight (`float`, *optional*):
            lambda, the weight of the preserved-key second moment (default per model, as for MEMIT).
        update_norm_weight (`float`, *optional*, defaults to `0.0`):
            mu, ENCORE's Frobenius-norm penalty on each update (`mu I` in the system; see
            [`~memit_hf.algorithms.config.update_norm_field`]).
    """

    name: ClassVar[str] = "memit_seq"
    implementation: ClassVar[str] = ".algorithm:MEMITSeq"
    paper: ClassVar[str] = "https://huggingface.co/papers/2210.07229"

    update_norm_weight: float = update_norm_field()

    def __post_init__(self):
        super().__post_init__()
        check_update_norm_weight(self.update_norm_weight)
