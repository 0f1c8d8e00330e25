"""The `memit-hf` entry point: parse the command line and run one subcommand."""

import logging
import warnings

from .adapters import run_export, run_push
from .demo import run_demo
from .edit import run_edit, run_stats
from .evaluate import run_evaluate
from .parsing import parse_args


THIRD_PARTY_NOISE = (
    # peft 0.21 on transformers 5 asks for `is_gradient_checkpointing` while loading any adapter; nothing to act on.
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning),
)
"""Deprecation warnings of our dependencies that a user cannot act on, hidden while a `memit-hf` command runs (only
there: importing memit-hf changes no warning filter)."""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `memit-hf` command; returns the exit code."""
    namespace, args = parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("memit_hf").setLevel(logging.INFO)
    commands = {
        "edit": run_edit, "stats": run_stats, "evaluate": run_evaluate, "demo": run_demo, "export": run_export,
        "push": run_push,
    }  # fmt: skip
    with warnings.catch_warnings():
        for message, category in THIRD_PARTY_NOISE:
            warnings.filterwarnings("ignore", message=message, category=category)
        commands[namespace.command](namespace, args)
    return 0
