"""memit-hf: mass-edit the factual knowledge of Hugging Face causal language models."""

__version__ = "0.1.0.dev0"
