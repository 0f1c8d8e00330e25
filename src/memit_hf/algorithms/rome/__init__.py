"""ROME: the rank-one (per fact) equality-constrained update of a single layer."""

from .config import ROMEConfig


__all__ = ["ROMEConfig"]
