"""MEMIT: least-squares mass editing spread over several layers."""

from .config import MEMITConfig


__all__ = ["MEMITConfig"]
