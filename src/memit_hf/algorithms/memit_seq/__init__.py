"""Accumulated-key MEMIT for sequential editing."""

from .config import MEMITSeqConfig


__all__ = ["MEMITSeqConfig"]
