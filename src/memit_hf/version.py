"""The version of memit-hf (a leaf: every module that records it imports it from here)."""

__version__ = "0.1.0.dev0"
