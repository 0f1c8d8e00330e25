"""AlphaEdit: null-space-projected sequential editing."""

from .config import AlphaEditConfig


__all__ = ["AlphaEditConfig"]
