"""`memit-hf edit`: apply fact edits and write them as a peft LoRA adapter (or a merged checkpoint)."""

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..arguments import EditingArguments
from .common import corpus_paths, jsonable, load_model
from .parsing import checked_export_rank, command_parser, corpus_field, export_rank_field, model_field


if TYPE_CHECKING:
    from transformers import HfArgumentParser


@dataclass
class EditScriptArguments:
    """The options of `memit-hf edit` besides its [`EditingArguments`].

    Args:
        requests (`str`): JSON or JSONL file of edit requests.
        model (`str`, *optional*): model directory, Hub id or `.gguf` file (`None`: the embedded SmolLM2).
        corpus (`list[str]`, *optional*): plain-text files for the covariance statistics.
        evaluate (`bool`, *optional*, defaults to `False`): also run the CounterFact evaluation.
        merged (`bool`, *optional*, defaults to `False`): write the full edited checkpoint instead of the adapter.
        overwrite_output_dir (`bool`, *optional*, defaults to `False`): replace the other kind of artefact found in
            the output folder.
        state_dir (`str`, *optional*): continue the editor state saved there (sequential editing) and save the new
            one there.
        export_rank (`int`, `float` or `str`, *optional*): store at most this rank per module (`int`), or keep this
            fraction of each update's energy (`float`); a string from the command line is parsed into either.
    """

    requests: str = field(
        metadata={
            "help": "JSON or JSONL file of edit requests (canonical, CounterFact, EasyEdit or zsRE records).",
            "metavar": "FILE",
        }
    )
    model: str | None = model_field()
    corpus: list[str] | None = corpus_field()
    evaluate: bool = field(
        default=False,
        metadata={
            "help": "Also run the CounterFact evaluation (requests need `target_true`) and add it to the metrics."
        },
    )
    merged: bool = field(default=False, metadata={"help": "Write the full edited checkpoint instead of the adapter."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Replace the other kind of artefact found in --output-dir (a merged checkpoint when writing the "
            "adapter, the adapter with --merged): its files are removed. Without it such a folder is refused, so that "
            "an adapter never sits beside merged weights."
        },
    )
    state_dir: str | None = field(
        default=None,
        metadata={
            "help": "Sequential editing: continue the editor state saved in DIR (if any), then save the new state "
            "there with the whole history as one adapter and one adapter per batch (`--output-dir` defaults to DIR).",
            "metavar": "DIR",
        },
    )
    export_rank: str | None = export_rank_field()

    def __post_init__(self):
        self.export_rank = checked_export_rank(self.export_rank)


def make_parser(subparsers: Any | None = None) -> "HfArgumentParser":
    """The parser of `memit-hf edit` (a subcommand of `subparsers`, or stand-alone): [`EditScriptArguments`] and
    [`EditingArguments`]."""
    return command_parser(
        subparsers,
        "edit",
        [EditScriptArguments, EditingArguments],
        help_text="Apply fact edits and write them to --output-dir as a peft LoRA adapter.",
        description="Apply all requests at once with MEMIT (or ROME) and write the edit to the output directory as a "
        "peft LoRA adapter (`adapter_config.json`, `adapter_model.safetensors`, `memit_edits.json`, a model card), "
        "plus `edit_metrics.json`. `--merged` writes the full edited checkpoint instead; `--push_to_hub` uploads the "
        "adapter (or checkpoint) to `--hub_model_id` with `Editor.push_to_hub`.",
    )


@dataclass
class OutputPlan:
    """Where `memit-hf edit` writes, checked before the edit runs.

    Args:
        output_dir (`Path`): the folder of the adapter (or checkpoint) and `edit_metrics.json`.
        state_dir (`Path`, *optional*): the editor state's folder (`--state-dir`).
        in_state_dir (`bool`): whether the outputs go to the state folder itself.
        folders (`dict[Path, str]`): each written folder and the kind of artefact written there.
        replaced (`dict[Path, bool]`): whether the other kind's files are removed from each folder first.
    """

    output_dir: Path
    state_dir: Path | None
    in_state_dir: bool
    folders: dict[Path, str]
    replaced: dict[Path, bool]


def main(script_args: EditScriptArguments, editing_args: EditingArguments | None = None) -> dict[str, Any]:
    """`memit-hf edit`: edit, then write the adapter (or, with `--merged`, the edited checkpoint) and
    `edit_metrics.json` to `--output-dir`; with `--push_to_hub`, push the adapter (or checkpoint) with
    [`Editor.push_to_hub`]. With `--state-dir`, continue the editor state saved there (if any) and save the new one
    there, with the adapters (`--output-dir` defaults to it). A folder holding the other kind of artefact is refused
    before the edit runs, unless `--overwrite_output_dir` (then its files are removed).

    Args:
        script_args ([`EditScriptArguments`]): the command's options.
        editing_args ([`EditingArguments`], *optional*): the edit's arguments (default: the defaults).

    Returns:
        `dict[str, Any]`: the summary written to `edit_metrics.json` (metrics, resolved arguments, counts).
    """
    from ..requests import load_requests

    args = editing_args if editing_args is not None else EditingArguments()
    plan = plan_outputs(script_args, args)
    corpus = corpus_paths(script_args.corpus)
    requests = load_requests(script_args.requests)
    plan.output_dir.mkdir(parents=True, exist_ok=True)

    with state_lock(plan.state_dir):  # the whole load-edit-save cycle: a second run on the state stops with a message
        return edit_and_write(script_args, args, requests=requests, corpus=corpus, plan=plan)


def plan_outputs(script_args: EditScriptArguments, args: EditingArguments) -> OutputPlan:
    """The folders `memit-hf edit` writes, checked before the edit runs (one kind of artefact per folder), so that a
    refusal costs nothing.

    Raises:
        SystemExit: without an output folder, without a repository to push to, for `--merged` or `--export-rank`
            into the state folder, or for a folder holding the other kind of artefact (without
            `--overwrite_output_dir`).
    """
    from ..export import check_output_dir

    state_dir = Path(script_args.state_dir) if script_args.state_dir else None
    if args.output_dir is None and state_dir is None:
        raise SystemExit("memit-hf edit: error: --output-dir (or --state-dir) is required.")
    if args.push_to_hub and not args.hub_model_id:
        raise SystemExit("memit-hf edit: error: --push_to_hub needs --hub_model_id.")
    output_dir = Path(args.output_dir) if args.output_dir else state_dir
    in_state_dir = state_dir is not None and output_dir.resolve() == state_dir.resolve()
    if in_state_dir and (script_args.merged or script_args.export_rank is not None):
        raise SystemExit(
            "memit-hf edit: error: --merged and --export-rank write to another --output-dir than --state-dir (the "
            "state folder keeps the exact adapters)."
        )
    kind = "checkpoint" if script_args.merged else "adapter"
    folders = {output_dir: kind} | ({state_dir: "adapter"} if state_dir is not None and not in_state_dir else {})
    try:
        replaced = {
            folder: bool(check_output_dir(folder, new, script_args.overwrite_output_dir))
            for folder, new in folders.items()
        }
    except ValueError as error:
        raise SystemExit(f"memit-hf edit: error: {error}") from None
    return OutputPlan(output_dir, state_dir, in_state_dir, folders, replaced)


def state_lock(state_dir: Path | None) -> contextlib.ExitStack:
    """The lock of `--state-dir`, held by the main process until the returned context exits (nothing without a state
    folder). Every process learns whether it was taken, so a refusal stops all of them instead of leaving the others
    at a barrier.

    Raises:
        SystemExit: when another run holds the lock, with its message.
    """
    from ..distributed import process_state
    from ..editor_state import StateLock, StateLockedError

    held = contextlib.ExitStack()
    if state_dir is None:
        return held
    state = process_state()
    error = None
    if state.is_main_process:
        try:
            held.enter_context(StateLock(state_dir))
        except StateLockedError as refused:
            error = str(refused)
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        error = broadcast_object_list([error])[0]
    if error is not None:
        raise SystemExit(f"memit-hf edit: error: {error}")
    return held


def edit_and_write(
    script_args: EditScriptArguments, args: EditingArguments, *, requests: Any, corpus: Any, plan: OutputPlan
) -> dict[str, Any]:
    """The body of [`main`] once its arguments are checked (under the state's lock)."""
    from ..editor import Editor
    from ..editor_state import is_state_dir
    from ..export import EDIT_METRICS_NAME, remove_artefact_files, write_json
    from ..redaction import redact

    state_dir, output_dir, folders, replaced = plan.state_dir, plan.output_dir, plan.folders, plan.replaced
    model, tokenizer = load_model(script_args.model, args)
    continued = state_dir is not None and is_state_dir(state_dir)
    if continued:
        editor = Editor.from_state(model, state_dir, args=args, processing_class=tokenizer, stats_dataset=corpus)
    else:
        editor = Editor(model, args=args, processing_class=tokenizer, stats_dataset=corpus)
    output = editor.edit(requests)
    resolved = editor.resolved_args.to_dict()
    metrics = dict(output.metrics)
    if script_args.evaluate:
        metrics.update(editor.evaluate(requests))
        output.record.metrics = dict(metrics)  # the model card shows the evaluation
    output.record.extra["source"] = {"requests": str(script_args.requests), "corpus": [str(p) for p in corpus or []]}

    if editor.state.is_main_process:  # `--overwrite_output_dir`: the other kind goes before the new files come
        for folder, new in folders.items():
            if replaced[folder]:
                removed = remove_artefact_files(folder, "adapter" if new == "checkpoint" else "checkpoint")
                print(f"  removed {', '.join(removed)} from {folder} (--overwrite_output_dir)")
    report = None
    if state_dir is not None:
        report = editor.save_state(state_dir)
    if script_args.merged:  # with `--push_to_hub` the saves push what they wrote, as `Trainer.save_model` does
        editor.merge_and_save(output_dir, repo_id=args.hub_model_id)
        written = "the edited checkpoint"
    elif not plan.in_state_dir:
        report = editor.save_adapter(output_dir, export_rank=script_args.export_rank, repo_id=args.hub_model_id)
    elif args.push_to_hub:  # the adapter is the state folder's: pushed on its own
        editor.push_to_hub(export_rank=script_args.export_rank)
    held = editor.edit_metadata(include_requests=False)  # consolidated batches (`--keep_history`) included
    summary = {
        "metrics": metrics,
        "args": redact(resolved),
        "num_requests": len(output.requests),
        "num_edits_total": held["num_edits"],
        "num_batches": len(held["batches"]),
    }
    if not editor.state.is_main_process:  # under `accelerate launch`: the main process wrote the files and reports
        return summary
    if not script_args.merged:
        metrics["adapter_bytes"] = report.adapter_bytes
        metrics["adapter_max_reconstruction_error"] = report.max_reconstruction_error
        written = f"the adapter ({report.adapter_bytes / 1e6:.2f} MB, ranks {sorted(set(report.ranks.values()))})"
    write_json(output_dir / EDIT_METRICS_NAME, jsonable(summary))

    name = script_args.model or getattr(model.config, "_name_or_path", None)
    print(
        f"Edited {len(output.requests)} facts in {name} at layers {resolved['layers']} with {resolved['algorithm']}."
    )
    if state_dir is not None:
        print(
            f"  {'continued' if continued else 'started'} the state in {state_dir}: batch {summary['num_batches']}, "
            f"{summary['num_edits_total']} edits so far (the adapters in it hold all of them; batches/ one each)"
        )
    print(
        f"  total {metrics['total_seconds']:.1f}s (statistics {metrics['statistics_seconds']:.1f}s, "
        f"values {metrics['values_seconds']:.1f}s, update {metrics['update_seconds']:.1f}s); "
        f"z loss {metrics['z_initial_loss']:.3f} -> {metrics['z_final_loss']:.3f}; "
        f"residual achieved {100 * metrics['residual_achieved']:.1f}%"
    )
    if script_args.evaluate:
        print(
            f"  efficacy {metrics['efficacy_success']:.1f}  paraphrase {metrics['paraphrase_success']:.1f}  "
            f"neighborhood {metrics['neighborhood_success']:.1f}  score {metrics['score']:.1f}"
        )
    print(f"  wrote {written} and edit_metrics.json to {output_dir}")
    if args.push_to_hub:
        print(f"  pushed to {args.hub_model_id}")
    return summary
