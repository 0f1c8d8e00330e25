"""Argument parsing of the `memit-hf` command: one subparser per command, `EditingArguments` fields as flags, YAML
recipes through `--config`. Imports no torch, so that `--help` stays fast."""

import argparse
import json
import sys
from dataclasses import fields
from typing import Any

import yaml

from ..algorithms import ALGORITHM_CONFIGS, method_field_names
from ..arguments import EditingArguments


COMMANDS = ("edit", "stats", "evaluate", "demo", "export", "push")
EDITING_COMMANDS = ("edit", "stats", "evaluate", "demo")
"""The commands whose flags are the `EditingArguments` fields."""
EDITING_FIELDS = tuple(f.name for f in fields(EditingArguments))
METHOD_FIELDS = method_field_names()
"""Hyperparameters of the registered methods, also flags of the editing commands (each belongs to the methods whose
configuration has it; `--algorithm` decides which one applies)."""

# Demo facts: SmolLM2-135M-Instruct completes each prompt with the true object under greedy decoding
# (shared/docs/models.md section 3), so the before/after contrast is visible in plain generations.


DEMO_DEFAULTS = dict(stats_sample_texts=32, stats_sample_length=96, num_context_templates=3)
"""Defaults of `memit-hf demo` that keep it well under two minutes on 2 CPU cores (flags still override them)."""


EVALUATION_CHOICES = ("counterfact", "zsre", "generation", "generative", "multihop", "perplexity")
"""`--metrics` choices of `memit-hf evaluate` (`memit_hf.evaluation.EVALUATION_METRICS`, kept here so that `--help`
imports no torch)."""


def _json_object(value: str) -> dict[str, Any]:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {value!r} ({error.msg})") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {value!r}")
    return parsed


def _editing_parser(subparsers, name: str, help_text: str, description: str) -> argparse.ArgumentParser:
    """A subcommand parser (an `HfArgumentParser`) holding every `EditingArguments` field as a flag, plus `--config`."""
    parser = subparsers.add_parser(
        name,
        help=help_text,
        description=description,
        dataclass_types=[EditingArguments],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _configure_editing_parser(parser)
    return parser


def _configure_editing_parser(parser: argparse.ArgumentParser) -> None:
    """JSON for `dict` fields, the methods' hyperparameter flags and `--config` on an `EditingArguments` parser."""
    for action in parser._actions:
        # HfArgumentParser cannot parse `dict` fields (`model_init_kwargs`): take them as JSON objects.
        if action.dest in EDITING_FIELDS and getattr(action.type, "__origin__", None) is dict:
            action.type = _json_object
            action.metavar = "JSON"
    _add_method_flags(parser)
    parser.add_argument(
        "--config",
        metavar="YAML",
        default=None,
        help="YAML recipe whose keys are `EditingArguments` fields or the method's hyperparameters; command-line "
        "flags win over it.",
    )


def _boolean(value: str) -> bool:
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _boolean_or_repo(value: str) -> bool | str:
    """`memit-hf stats --push_to_hub`: a boolean, or the repository id to push to."""
    try:
        return _boolean(value)
    except argparse.ArgumentTypeError:
        return value


def _add_method_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per hyperparameter of the registered methods (default `None`: the method's own default)."""
    seen: set[str] = set()
    for config in ALGORITHM_CONFIGS.values():
        for item in fields(config):
            if item.name in seen or item.name in EDITING_FIELDS:
                continue
            seen.add(item.name)
            owners = [name for name, other in ALGORITHM_CONFIGS.items() if item.name in other.field_names()]
            kind = item.type if isinstance(item.type, type) else float if "float" in str(item.type) else str
            kind = _boolean if kind is bool else kind if kind in (int, float, str) else str
            aliases = [f"--{item.name}"] + ([f"--{item.name.replace('_', '-')}"] if "_" in item.name else [])
            parser.add_argument(
                *aliases, dest=item.name, type=kind, default=None,
                help=f"[{', '.join(owners)}] {item.metadata.get('help', '')}",
            )  # fmt: skip


def _add_model_and_corpus(parser: argparse.ArgumentParser, with_model: bool = True) -> None:
    if with_model:
        parser.add_argument(
            "--model",
            metavar="PATH_OR_GGUF",
            default=None,
            help="Model directory, Hub id or `.gguf` file (default: the embedded SmolLM2-135M-Instruct).",
        )
    parser.add_argument(
        "--corpus",
        metavar="FILE",
        nargs="+",
        default=None,
        help="Plain-text files for the covariance statistics, documents separated by blank lines (default: text "
        "sampled from the model itself, offline).",
    )


def make_parser() -> argparse.ArgumentParser:
    """The `memit-hf` argument parser, with one subparser per command."""
    from transformers import HfArgumentParser

    from ..version import __version__

    parser = argparse.ArgumentParser(
        prog="memit-hf", description="Mass-edit facts in Hugging Face causal LMs with MEMIT."
    )
    parser.add_argument("--version", action="version", version=f"memit-hf {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=HfArgumentParser)

    edit = _editing_parser(
        subparsers,
        "edit",
        "Apply fact edits and write them to --output-dir as a peft LoRA adapter.",
        "Apply all requests at once with MEMIT (or ROME) and write the edit to the output directory as a peft LoRA "
        "adapter (`adapter_config.json`, `adapter_model.safetensors`, `memit_edits.json`, a model card), plus "
        "`edit_metrics.json`. `--merged` writes the full edited checkpoint instead; `--push_to_hub` uploads the "
        "result to `--hub_model_id`.",
    )
    _add_model_and_corpus(edit)
    edit.add_argument(
        "--requests",
        metavar="FILE",
        required=True,
        help="JSON or JSONL file of edit requests (canonical, CounterFact, EasyEdit or zsRE records).",
    )
    edit.add_argument(
        "--evaluate",
        action="store_true",
        help="Also run the CounterFact evaluation (requests need `target_true`) and add it to the metrics.",
    )
    edit.add_argument("--merged", action="store_true", help="Write the full edited checkpoint instead of the adapter.")
    edit.add_argument(
        "--overwrite_output_dir", "--overwrite-output-dir", action="store_true",
        help="Replace the other kind of artefact found in --output-dir (a merged checkpoint when writing the adapter, "
        "the adapter with --merged): its files are removed. Without it such a folder is refused, so that an adapter "
        "never sits beside merged weights.",
    )  # fmt: skip
    edit.add_argument(
        "--state-dir",
        "--state_dir",
        metavar="DIR",
        default=None,
        help="Sequential editing: continue the editor state saved in DIR (if any), then save the new state there "
        "with the whole history as one adapter and one adapter per batch (`--output-dir` defaults to DIR).",
    )
    _add_export_rank(edit)

    stats = _editing_parser(
        subparsers,
        "stats",
        "Compute (or load from cache) the covariance statistics of the edited layers.",
        "Compute the second-moment statistics of the edited modules' inputs and cache them on disk, so that later "
        "edits with the same model, corpus and budget reuse them. Run it under `accelerate launch` to split the "
        "corpus between processes; an interrupted run resumes from its checkpoint. `--push_to_hub REPO` uploads "
        "them to a Hub dataset repository that `--stats_repo REPO` reads back.",
    )
    _add_model_and_corpus(stats)
    for action in stats._actions:
        if action.dest == "push_to_hub":  # `--push_to_hub REPO` as well as `--push_to_hub --hub_model_id REPO`
            action.type = _boolean_or_repo
            action.metavar = "REPO"
            action.help = (
                "Upload the statistics (safetensors + fingerprint JSON of every layer, and a dataset card) to this "
                "Hub dataset repository, or to --hub_model_id."
            )
    _add_evaluate_parser(subparsers)

    demo = _editing_parser(
        subparsers,
        "demo",
        "Edit three well-known facts in the embedded SmolLM2 and show generations before and after.",
        "Edit three facts in SmolLM2-135M-Instruct, show greedy generations before and after the edit, save the edit "
        "as a peft adapter (to --output-dir if given), restore the original weights, and load the adapter back.",
    )
    _add_model_and_corpus(demo)
    demo.set_defaults(**DEMO_DEFAULTS)

    export = subparsers.add_parser(
        "export",
        help="Turn an edit adapter into a merged checkpoint, or re-export it at a lower rank.",
        description="With --merged, load the adapter's base model (or --model), fold the edit into its weights and "
        "save a full checkpoint that `AutoModelForCausalLM.from_pretrained` loads. Without it, write the adapter "
        "again at --export-rank (lossy; the reconstruction error is printed).",
        dataclass_types=[],
    )
    export.add_argument("adapter", metavar="ADAPTER_DIR", help="Directory written by `memit-hf edit`.")
    export.add_argument("--output-dir", "--output_dir", required=True, help="Where to write the result.")
    export.add_argument("--merged", action="store_true", help="Write a merged full checkpoint.")
    export.add_argument(
        "--model", metavar="PATH_OR_GGUF", default=None,
        help="Base model (default: the adapter's `base_model_name_or_path`; the embedded SmolLM2 for its id).",
    )  # fmt: skip
    _add_export_rank(export)

    push = subparsers.add_parser(
        "push",
        help="Upload an adapter or merged checkpoint folder to the Hugging Face Hub.",
        description="Create the repository if needed and upload the folder, with its model card updated to name "
        "the repository.",
        dataclass_types=[],
    )
    push.add_argument("folder", metavar="FOLDER", help="Adapter or checkpoint directory.")
    push.add_argument("--repo-id", "--repo_id", required=True, help="`user/name` on the Hub.")
    push.add_argument("--private", action=argparse.BooleanOptionalAction, default=None, help="Repository visibility.")
    push.add_argument("--token", default=None, help="Hub token (default: the logged-in one or `HF_TOKEN`).")
    push.add_argument("--commit-message", "--commit_message", default=None)
    push.add_argument("--revision", default=None, help="Branch to push to.")
    return parser


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


def _add_export_rank(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--export-rank", "--export_rank", type=export_rank_type, default=None, metavar="RANK",
        help="Store at most this rank per module (integer), or keep this fraction of each update's energy (float in "
        "(0, 1]); lossy below the update's rank. Default: exact.",
    )  # fmt: skip


def subcommand_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[command]


def _explicit_config_path(argv: list[str]) -> str | None:
    """The value of `--config` in `argv`, without running the full parser."""
    finder = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    finder.add_argument("--config", default=None)
    known, _ = finder.parse_known_args(argv)
    return known.config


def apply_config(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Make the YAML recipe of `--config` in `argv` (if any) the defaults of `parser`, so flags still win.

    Raises:
        SystemExit: on an unreadable file or a key that is neither an `EditingArguments` field nor a method
            hyperparameter.
    """
    config_path = _explicit_config_path(argv)
    if config_path is None:
        return
    try:
        with open(config_path, encoding="utf-8") as handle:
            values = yaml.safe_load(handle) or {}
    except OSError as error:
        parser.error(f"cannot read --config {config_path}: {error}")
    if not isinstance(values, dict):
        parser.error(f"--config {config_path} must hold a YAML mapping of `EditingArguments` fields.")
    unknown = sorted(set(values) - set(EDITING_FIELDS) - set(METHOD_FIELDS))
    if unknown:
        parser.error(
            f"unknown `EditingArguments` keys in {config_path}: {unknown}. Known keys: {list(EDITING_FIELDS)} "
            f"and the methods' hyperparameters {list(METHOD_FIELDS)}."
        )
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


def make_script_parser(description: str) -> argparse.ArgumentParser:
    """A stand-alone parser with the flags of the editing commands (every `EditingArguments` field, the methods'
    hyperparameters, `--config`, `--model`, `--corpus`), for scripts such as `examples/`; add your own flags and
    read it with [`parse_script_args`]."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(
        [EditingArguments], description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    _configure_editing_parser(parser)
    _add_model_and_corpus(parser)
    return parser


def parse_script_args(
    parser: argparse.ArgumentParser, argv: list[str] | None = None
) -> tuple[argparse.Namespace, EditingArguments]:
    """Parse a [`make_script_parser`] command line as the `memit-hf` commands do: `--config` first, flags win."""
    argv = list(sys.argv[1:] if argv is None else argv)
    apply_config(parser, argv)
    namespace = parser.parse_args(argv)
    return namespace, editing_arguments(namespace, parser)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, EditingArguments]:
    """Parse the command line into the command's own options and an [`EditingArguments`].

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
    if namespace.command not in EDITING_COMMANDS:
        return namespace, EditingArguments()
    return namespace, editing_arguments(namespace, subcommand_parser(parser, namespace.command))


# ----------------------------------------------------------------------------------------------------- commands


def _add_evaluate_parser(subparsers) -> None:
    """The `evaluate` subcommand: every `EditingArguments` flag (used with `--edit`) plus its own options."""
    evaluate = _editing_parser(
        subparsers,
        "evaluate",
        "Evaluate a model on requests (CounterFact, zsRE, generation, generative, multi-hop, perplexity); write JSON "
        "and Markdown.",
        "Evaluate the model on the requests, optionally after editing it with them (`--edit`: the unedited figures "
        "are reported beside the edited ones), and write `evaluation.json` and `evaluation.md` to --output-dir.",
    )
    _add_model_and_corpus(evaluate)
    evaluate.add_argument(
        "--requests",
        metavar="FILE",
        required=True,
        help="JSON or JSONL file of requests (canonical, CounterFact, EasyEdit, zsRE or MQuAKE records).",
    )
    evaluate.add_argument(
        "--metrics",
        nargs="+",
        choices=EVALUATION_CHOICES,
        default=["counterfact"],
        help="Metric families: `counterfact` and `zsre` (teacher-forced), `generation` (sampled-text fluency), "
        "`generative` (greedy answers, plain and through the chat template), `multihop` (MQuAKE questions); "
        "`perplexity` needs --perplexity-corpus (which adds it).",
    )
    evaluate.add_argument("--edit", action="store_true", help="Edit the model with the requests before evaluating.")
    evaluate.add_argument(
        "--adapter", metavar="DIR_OR_REPO", default=None,
        help="Evaluate the model with this edit adapter loaded (peft); the unedited figures come from the model "
        "with the adapter switched off.",
    )  # fmt: skip
    evaluate.add_argument("--num-requests", type=int, default=None, metavar="N", help="Use only the first N requests.")
    evaluate.add_argument(
        "--perplexity-corpus",
        metavar="FILE",
        nargs="+",
        default=None,
        help="Held-out text files whose perplexity is reported (documents separated by blank lines).",
    )
    evaluate.add_argument(
        "--perplexity-tokens", type=int, default=None, metavar="N", help="Token budget of the perplexity."
    )
    evaluate.add_argument("--batch-size", type=int, default=64, help="Sequences per forward pass.")
