"""Hyperparameters of AlphaEdit."""

from dataclasses import dataclass, field
from typing import ClassVar

from ..config import AlgorithmConfig


@dataclass
class AlphaEditConfig(AlgorithmConfig):
    """Configuration of [`AlphaEdit`]: the update projected onto the null space of the preserved keys.

    Args:
        nullspace_threshold (`float`, *optional*, defaults to `1e-2`):
            Eigenvectors of the preserved keys' second moment whose eigenvalue is below this fraction of the
            largest one span the null space (a rule relative to the spectrum, so it transfers between models; the
            reference's absolute 2e-2 depends on the activation scale). Ignored when `nullspace_energy` is set.
        nullspace_energy (`float`, *optional*):
            Instead of `nullspace_threshold`: the null space is spanned by the eigenvectors of the smallest
            eigenvalues whose sum is at most this fraction of the trace (the share of the preserved keys' energy
            that the update may touch). Unlike a threshold relative to the largest eigenvalue, it does not depend on
            how far a few outlier directions stand above the rest of the spectrum.
        alphaedit_l2 (`float`, *optional*, defaults to `10.0`):
            The ridge `alpha` of the projected solve (the reference's `L2`), in units of the mean eigenvalue of the
            preserved keys' second moment (`trace(C0) / d_in`), so that it transfers between models whose
            activations differ in scale; the reference's absolute value equals this times that mean.
    """

    name: ClassVar[str] = "alphaedit"
    implementation: ClassVar[str] = ".algorithm:AlphaEdit"
    paper: ClassVar[str] = "https://huggingface.co/papers/2410.02355"

    nullspace_threshold: float = field(
        default=1e-2, metadata={"help": "AlphaEdit: null space = eigenvalues below this fraction of the largest."}
    )
    nullspace_energy: float | None = field(
        default=None,
        metadata={
            "help": "AlphaEdit: null space = smallest eigenvalues summing to at most this fraction of trace(C0)."
        },
    )
    alphaedit_l2: float = field(
        default=10.0, metadata={"help": "AlphaEdit ridge alpha, relative to trace(C0) / d_in."}
    )

    def __post_init__(self):
        if not 0 < self.nullspace_threshold < 1:
            raise ValueError(f"`nullspace_threshold` must be in (0, 1), got {self.nullspace_threshold}.")
        if self.nullspace_energy is not None and not 0 < self.nullspace_energy < 1:
            raise ValueError(f"`nullspace_energy` must be in (0, 1), got {self.nullspace_energy}.")
        if not self.alphaedit_l2 > 0:
            raise ValueError(f"`alphaedit_l2` must be positive, got {self.alphaedit_l2}.")
