"""EMMET: batched equality-constrained editing with a ridge."""

from .config import PUBLISHED_EMMET, EMMETConfig


__all__ = ["PUBLISHED_EMMET", "EMMETConfig"]
