"""What the `memit-hf` commands share in parsing: a command's parser (an `HfArgumentParser` of its dataclasses, as
TRL's scripts build theirs), the `EditingArguments` flags (JSON for `dict` fields, the methods' hyperparameters,
`--config`), the `--model` / `--corpus` fields, and the step from a parsed command line to the dataclasses. Imports
no torch, so that `--help` stays fast."""

import argparse
import json
import sys
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from ..algorithms import ALGORITHM_CONFIGS, method_field_names
from ..arguments import EditingArguments


if TYPE_CHECKING:
    from transformers import HfArgumentParser


EDITING_COMMANDS = ("edit", "stats", "evaluate", "demo")
"""The commands whose flags are the `EditingArguments` fields."""
EDITING_FIELDS = tuple(f.name for f in fields(EditingArguments))
METHOD_FIELDS = method_field_names()
"""Hyperparameters of the registered methods, also flags of the editing commands (each belongs to the methods whose
configuration has it; `--algorithm` decides which one applies)."""


def model_field() -> Any:
    """The `--model` field of a command's script arguments."""
    return field(
        default=None,
        metadata={
            "help": "Model directory, Hub id or `.gguf` file (default: the embedded SmolLM2-135M-Instruct).",
            "metavar": "PATH_OR_GGUF",
        },
    )


def corpus_field() -> Any:
    """The `--corpus` field of a command's script arguments."""
    return field(
        default=None,
        metadata={
            "help": "Plain-text files for the covariance statistics, documents separated by blank lines (default: "
            "text sampled from the model itself, offline).",
            "metavar": "FILE",
        },
    )


@dataclass
class ModelArguments:
    """The model and statistics corpus of a script built with [`make_script_parser`].

    Args:
        model (`str`, *optional*): model directory, Hub id or `.gguf` file (`None`: the embedded SmolLM2).
        corpus (`list[str]`, *optional*): plain-text files for the covariance statistics.
    """

    model: str | None = model_field()
    corpus: list[str] | None = corpus_field()


def json_object(value: str) -> dict[str, Any]:
    """A `dict` flag (`--model_init_kwargs '{"dtype": "bfloat16"}'`): `HfArgumentParser` cannot parse `dict` fields."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {value!r} ({error.msg})") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {value!r}")
    return parsed


def boolean(value: str) -> bool:
    """A boolean flag's value: `true`/`false`, `yes`/`no`, `1`/`0`."""
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def boolean_or_repo(value: str) -> bool | str:
    """`memit-hf stats --push_to_hub`: a boolean, or the repository id to push to."""
    try:
        return boolean(value)
    except argparse.ArgumentTypeError:
        return value


def export_rank_field() -> Any:
    """The `--export-rank` field of a command's script arguments (a string; [`checked_export_rank`] reads it)."""
    return field(
        default=None,
        metadata={
            "help": "Store at most this rank per module (integer), or keep this fraction of each update's energy "
            "(float in (0, 1]); lossy below the update's rank. Default: exact.",
            "metavar": "RANK",
        },
    )


def checked_export_rank(value: str | int | float | None) -> int | float | None:
    """The rank of an `--export-rank` field (see [`export_rank_type`]).

    Raises:
        ValueError: naming the field, for a value that is neither an integer nor a float.
    """
    if not isinstance(value, str):
        return value
    try:
        return export_rank_type(value)
    except argparse.ArgumentTypeError as error:
        raise ValueError(f"`export_rank`: {error}") from None


def export_rank_type(value: str) -> int | float:
    """`--export-rank`: an integer rank, or a float in (0, 1] read as a fraction of each update's energy."""
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer rank or an energy fraction, got {value!r}") from None


def command_parser(
    subparsers: Any | None,
    name: str,
    dataclass_types: list[type],
    help_text: str,
    description: str,
) -> "HfArgumentParser":
    """The parser of the command `name`: a subcommand of `subparsers` (the `memit-hf` command), or a stand-alone
    parser when `subparsers` is `None`, with one flag per field of `dataclass_types`. With [`EditingArguments`]
    among them it also takes `--config` and the methods' hyperparameters.

    Args:
        subparsers (`argparse._SubParsersAction`, *optional*): the subcommands of `memit-hf` (made with
            `parser_class=HfArgumentParser`).
        name (`str`): the command.
        dataclass_types (`list[type]`): the command's script arguments, then `EditingArguments` if it edits.
        help_text (`str`): one line for `memit-hf --help`.
        description (`str`): the command's `--help` description.

    Returns:
        `HfArgumentParser`: the parser.
    """
    from transformers import HfArgumentParser

    options = dict(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    if subparsers is None:
        parser = HfArgumentParser(dataclass_types, prog=f"memit-hf {name}", **options)
    else:
        parser = subparsers.add_parser(name, help=help_text, dataclass_types=dataclass_types, **options)
    if EditingArguments in dataclass_types:
        configure_editing_parser(parser)
    return parser


def configure_editing_parser(parser: argparse.ArgumentParser) -> None:
    """JSON for `dict` fields, the methods' hyperparameter flags and `--config` on an `EditingArguments` parser."""
    for action in parser._actions:
        if action.dest in EDITING_FIELDS and getattr(action.type, "__origin__", None) is dict:
            action.type = json_object
            action.metavar = "JSON"
    add_method_flags(parser)
    parser.add_argument(
        "--config",
        metavar="YAML",
        default=None,
        help="YAML recipe whose keys are `EditingArguments` fields or the method's hyperparameters; command-line "
        "flags win over it.",
    )


def add_method_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per hyperparameter of the registered methods (default `None`: the method's own default)."""
    seen: set[str] = set()
    for config in ALGORITHM_CONFIGS.values():
        for item in fields(config):
            if item.name in seen or item.name in EDITING_FIELDS:
                continue
            seen.add(item.name)
            owners = [name for name, other in ALGORITHM_CONFIGS.items() if item.name in other.field_names()]
            kind = item.type if isinstance(item.type, type) else float if "float" in str(item.type) else str
            kind = boolean if kind is bool else kind if kind in (int, float, str) else str
            aliases = [f"--{item.name}"] + ([f"--{item.name.replace('_', '-')}"] if "_" in item.name else [])
            parser.add_argument(
                *aliases,
                dest=item.name,
                type=kind,
                default=None,
                choices=item.metadata.get("choices"),
                help=f"[{', '.join(owners)}] {item.metadata.get('help', '')}",
            )


def positional(parser: argparse.ArgumentParser, dest: str) -> None:
    """Take the field `dest` of the parser's dataclasses as a positional argument (`memit-hf push FOLDER`):
    `HfArgumentParser` makes every field an option, which stays as a hidden alias."""
    option = next(action for action in parser._actions if action.dest == dest)
    help_text = option.help
    option.required, option.help = False, argparse.SUPPRESS
    parser.add_argument(dest, metavar=option.metavar or dest.upper(), help=help_text)


def subcommand_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The parser of `command` among the subcommands of `parser`."""
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[command]


def apply_config(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Make the YAML recipe of `--config` in `argv` (if any, read by [`EditingArguments.read_recipe`]) the defaults
    of `parser`, so flags still win.

    Raises:
        SystemExit: on an unreadable file, or a file [`EditingArguments.read_recipe`] refuses (with its message).
    """
    finder = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    finder.add_argument("--config", default=None)
    config_path = finder.parse_known_args(argv)[0].config
    if config_path is None:
        return
    try:
        values = EditingArguments.read_recipe(config_path)
    except OSError as error:
        parser.error(f"cannot read --config {config_path}: {error}")
    except ValueError as error:
        parser.error(str(error))
    parser.set_defaults(**values)


def editing_arguments(namespace: argparse.Namespace, parser: argparse.ArgumentParser) -> EditingArguments:
    """The [`EditingArguments`] of a parsed editing command line (method hyperparameters included).

    Raises:
        SystemExit: with the validation error of `EditingArguments`.
    """
    values = {name: getattr(namespace, name) for name in EDITING_FIELDS}
    if isinstance(values["push_to_hub"], str):  # `memit-hf stats --push_to_hub REPO`
        values["hub_model_id"], values["push_to_hub"] = values["push_to_hub"], True
    values.update({name: getattr(namespace, name) for name in METHOD_FIELDS if getattr(namespace, name) is not None})
    try:
        return EditingArguments.from_flat(values, where="the command line")
    except (TypeError, ValueError) as error:
        parser.error(str(error))


def command_arguments(
    parser: "HfArgumentParser", namespace: argparse.Namespace
) -> tuple[Any, EditingArguments | None]:
    """The dataclasses of a command parsed by `parser`: its script arguments and its [`EditingArguments`] (`None` for
    a command without them).

    Raises:
        SystemExit: with the validation error of either.
    """
    script_args, editing_args = None, None
    for dataclass_type in parser.dataclass_types:
        if dataclass_type is EditingArguments:
            editing_args = editing_arguments(namespace, parser)
            continue
        values = {item.name: getattr(namespace, item.name) for item in fields(dataclass_type) if item.init}
        try:
            script_args = dataclass_type(**values)
        except (TypeError, ValueError) as error:
            parser.error(str(error))
    return script_args, editing_args


def parse_command(parser: "HfArgumentParser", argv: list[str] | None = None) -> tuple[Any, EditingArguments | None]:
    """Parse the command line of one command's parser (a `make_parser()` of a command module): `--config` first,
    flags win.

    Args:
        parser (`HfArgumentParser`): the command's parser.
        argv (`list[str]`, *optional*): the arguments (default: `sys.argv[1:]`).

    Returns:
        `tuple`: the script arguments and the [`EditingArguments`] (`None` for a command without them).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    apply_config(parser, argv)
    return command_arguments(parser, parser.parse_args(argv))


def make_script_parser(description: str) -> argparse.ArgumentParser:
    """A stand-alone parser with the flags of the editing commands (every `EditingArguments` field, the methods'
    hyperparameters, `--config`, `--model`, `--corpus`), for scripts such as `examples/`; add your own flags and
    read it with [`parse_script_args`]."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(
        [ModelArguments, EditingArguments],
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    configure_editing_parser(parser)
    return parser


def parse_script_args(
    parser: argparse.ArgumentParser, argv: list[str] | None = None
) -> tuple[argparse.Namespace, EditingArguments]:
    """Parse a [`make_script_parser`] command line as the `memit-hf` commands do: `--config` first, flags win.

    Returns:
        `tuple`: the namespace of every flag (the script's own, `model`, `corpus`, ...) and the
        [`EditingArguments`].
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    apply_config(parser, argv)
    namespace = parser.parse_args(argv)
    return namespace, editing_arguments(namespace, parser)
