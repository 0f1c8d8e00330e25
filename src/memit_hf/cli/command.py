"""The `memit-hf` entry point: the top-level parser assembled from the command modules' `make_parser`, and `main`,
which runs one command."""

import argparse
import logging
import sys
import warnings
from types import ModuleType
from typing import Any

from ..arguments import EditingArguments
from . import demo, edit, evaluate, export, push, stats
from .parsing import EDITING_COMMANDS, apply_config, command_arguments, subcommand_parser


THIRD_PARTY_NOISE = (
    # peft 0.21 on transformers 5 asks for `is_gradient_checkpointing` while loading any adapter; nothing to act on.
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning),
)
"""Deprecation warnings of our dependencies that a user cannot act on, hidden while a `memit-hf` command runs (only
there: importing memit-hf changes no warning filter)."""


def command_modules() -> dict[str, ModuleType]:
    """The module of each `memit-hf` command, in the order of `memit-hf --help`; each has `make_parser` and `main`."""
    return {"edit": edit, "stats": stats, "evaluate": evaluate, "demo": demo, "export": export, "push": push}


def make_parser() -> argparse.ArgumentParser:
    """The `memit-hf` argument parser: one subcommand per command module, from its `make_parser(subparsers)`."""
    from transformers import HfArgumentParser

    from ..version import __version__

    parser = argparse.ArgumentParser(
        prog="memit-hf", description="Mass-edit facts in Hugging Face causal LMs with MEMIT."
    )
    parser.add_argument("--version", action="version", version=f"memit-hf {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=HfArgumentParser)
    for module in command_modules().values():
        module.make_parser(subparsers)
    return parser


def parse_command_line(argv: list[str] | None = None) -> tuple[str, Any, EditingArguments | None]:
    """Parse a `memit-hf` command line: the command, its script arguments and its [`EditingArguments`] (`None` for
    `export` and `push`).

    The YAML file of `--config` (if any) becomes the default of each field, so flags on the command line win.

    Raises:
        SystemExit: on an invalid command line, an unreadable `--config` file or a YAML key that is not an
            `EditingArguments` field.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser()
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    if command in EDITING_COMMANDS:
        apply_config(subcommand_parser(parser, command), argv)
    namespace = parser.parse_args(argv)
    if namespace.command is None:
        parser.print_help()
        parser.exit(2)
    return namespace.command, *command_arguments(subcommand_parser(parser, namespace.command), namespace)


def parse_args(argv: list[str] | None = None) -> tuple[Any, EditingArguments | None]:
    """Parse a `memit-hf` command line into the arguments of the command's `main`: its script arguments (e.g. an
    [`~memit_hf.cli.edit.EditScriptArguments`]) and its [`EditingArguments`] (`None` for `export` and `push`).

    Raises:
        SystemExit: as [`parse_command_line`].
    """
    _, script_args, editing_args = parse_command_line(argv)
    return script_args, editing_args


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `memit-hf` command; returns the exit code."""
    command, script_args, editing_args = parse_command_line(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("memit_hf").setLevel(logging.INFO)
    with warnings.catch_warnings():
        for message, category in THIRD_PARTY_NOISE:
            warnings.filterwarnings("ignore", message=message, category=category)
        command_modules()[command].main(script_args, editing_args)
    return 0
