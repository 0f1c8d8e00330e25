"""EMMET: batched equality-constrained editing with a ridge."""

from .config import EMMETConfig


__all__ = ["EMMETConfig"]
