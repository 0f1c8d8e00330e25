"""Hyperparameters of ROME."""

from dataclasses import dataclass
from typing import ClassVar

from ..config import AlgorithmConfig


@dataclass
class ROMEConfig(AlgorithmConfig):
    """Configuration of [`ROME`]: the equality-constrained update of a single layer. It has no hyperparameter of its
    own (lambda cancels out of the solution)."""

    name: ClassVar[str] = "rome"
    implementation: ClassVar[str] = ".algorithm:ROME"
    num_layers: ClassVar[int | None] = 1
    default_layers_fraction: ClassVar[float] = 0.2
    paper: ClassVar[str] = "https://huggingface.co/papers/2202.05262"
