"""`memit-hf stats`: compute (or load from cache) the covariance statistics of the edited layers."""

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..arguments import EditingArguments
from .common import corpus_paths, load_model
from .parsing import ModelArguments, boolean_or_repo, command_parser


if TYPE_CHECKING:
    from transformers import HfArgumentParser


@dataclass
class StatsScriptArguments(ModelArguments):
    """The options of `memit-hf stats` besides its [`EditingArguments`]: the model and the statistics corpus (see
    [`~memit_hf.cli.parsing.ModelArguments`])."""


def make_parser(subparsers: Any | None = None) -> "HfArgumentParser":
    """The parser of `memit-hf stats` (a subcommand of `subparsers`, or stand-alone): [`StatsScriptArguments`] and
    [`EditingArguments`], with `--push_to_hub REPO` naming the dataset repository."""
    parser = command_parser(
        subparsers,
        "stats",
        [StatsScriptArguments, EditingArguments],
        help_text="Compute (or load from cache) the covariance statistics of the edited layers.",
        description="Compute the second-moment statistics of the edited modules' inputs and cache them on disk, so "
        "that later edits with the same model, corpus and budget reuse them. Run it under `accelerate launch` to "
        "split the corpus between processes; an interrupted run resumes from its checkpoint. `--push_to_hub REPO` "
        "uploads them to a Hub dataset repository that `--stats_repo REPO` reads back.",
    )
    for action in parser._actions:
        if action.dest == "push_to_hub":  # `--push_to_hub REPO` as well as `--push_to_hub --hub_model_id REPO`
            action.type = boolean_or_repo
            action.metavar = "REPO"
            action.help = (
                "Upload the statistics (safetensors + fingerprint JSON of every layer, and a dataset card) to this "
                "Hub dataset repository, or to --hub_model_id."
            )
    return parser


def main(script_args: StatsScriptArguments, editing_args: EditingArguments | None = None) -> dict[str, int]:
    """`memit-hf stats`: compute or load the statistics of `args.layers` (default: the model's edited layers); with
    `--push_to_hub`, upload them with a card to the Hub dataset repository `--hub_model_id` (main process only).

    Args:
        script_args ([`StatsScriptArguments`]): the command's options.
        editing_args ([`EditingArguments`], *optional*): the statistics' arguments (default: the defaults).

    Returns:
        `dict[str, int]`: the token count of each edited module's statistics.
    """
    from ..editor import Editor

    args = editing_args if editing_args is not None else EditingArguments()
    if args.push_to_hub and not args.hub_model_id:
        raise SystemExit("memit-hf stats: error: --push_to_hub needs a repository: --push_to_hub REPO.")
    corpus = corpus_paths(script_args.corpus)
    model, tokenizer = load_model(script_args.model, args)
    editor = Editor(model, args=args, processing_class=tokenizer, stats_dataset=corpus)
    layers = editor.resolved_args.layers
    start = time.perf_counter()
    statistics = editor.get_statistics(layers)
    seconds = time.perf_counter() - start
    cache_dir = editor.statistics.cache.directory
    if args.stats_repo:
        source = f"`stats_repo` {args.stats_repo}"
    else:
        source = ", ".join(str(path) for path in corpus) if corpus else "text sampled from the model (offline default)"
    is_main = editor.statistics.state.is_main_process
    if is_main:
        print(f"Statistics of {len(statistics)} modules from {source} in {seconds:.1f}s, cached in {cache_dir}:")
        for name, layer in statistics.items():
            dim = layer.moment.total.shape[0]
            print(f"  {name}: {layer.count} tokens, dim {dim} ({layer.source}, key {layer.key})")
    if args.push_to_hub and is_main:
        from ..statistics import push_statistics

        commit = push_statistics(
            args.hub_model_id,
            [layer.fingerprint for layer in statistics.values()],
            editor.statistics.cache,
            private=args.hub_private_repo,
            token=args.hub_token,
        )
        print(f"  pushed to the dataset repository {args.hub_model_id}: {getattr(commit, 'commit_url', commit)}")
    return {name: layer.count for name, layer in statistics.items()}
