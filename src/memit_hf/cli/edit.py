"""`memit-hf edit` and `memit-hf stats`."""

import argparse
import contextlib
import time
from pathlib import Path
from typing import Any

from ..arguments import EditingArguments
from .common import corpus_paths, jsonable, load_model


def run_edit(namespace: argparse.Namespace, args: EditingArguments) -> dict[str, Any]:
    """`memit-hf edit`: edit, then write the adapter (or, with `--merged`, the edited checkpoint) and
    `edit_metrics.json` to `--output-dir`; push exactly those files when `--push_to_hub`. With `--state-dir`, continue
    the editor state saved there (if any) and save the new one there, with the adapters (`--output-dir` defaults to
    it). A folder holding the other kind of artefact is refused before the edit runs, unless `--overwrite_output_dir`
    (then its files are removed)."""
    from ..export import (
        check_output_dir,
    )
    from ..requests import load_requests

    state_dir = Path(namespace.state_dir) if namespace.state_dir else None
    if args.output_dir is None and state_dir is None:
        raise SystemExit("memit-hf edit: error: --output-dir (or --state-dir) is required.")
    if args.push_to_hub and not args.hub_model_id:
        raise SystemExit("memit-hf edit: error: --push_to_hub needs --hub_model_id.")
    output_dir = Path(args.output_dir) if args.output_dir else state_dir
    in_state_dir = state_dir is not None and output_dir.resolve() == state_dir.resolve()
    if in_state_dir and (namespace.merged or namespace.export_rank is not None):
        raise SystemExit(
            "memit-hf edit: error: --merged and --export-rank write to another --output-dir than --state-dir (the "
            "state folder keeps the exact adapters)."
        )
    # One kind of artefact per folder: checked before the edit runs, so that a refusal costs nothing.
    kind = "checkpoint" if namespace.merged else "adapter"
    folders = {output_dir: kind} | ({state_dir: "adapter"} if state_dir is not None and not in_state_dir else {})
    try:
        replaced = {folder: bool(check_output_dir(folder, new, namespace.overwrite_output_dir))
                    for folder, new in folders.items()}  # fmt: skip
    except ValueError as error:
        raise SystemExit(f"memit-hf edit: error: {error}") from None
    corpus = corpus_paths(namespace.corpus)
    requests = load_requests(namespace.requests)
    output_dir.mkdir(parents=True, exist_ok=True)

    with state_lock(state_dir):  # the whole load-edit-save cycle: a second run on the state stops with a message
        return edit_and_write(
            namespace, args, requests, corpus, state_dir, output_dir, in_state_dir, folders, replaced
        )


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
    namespace: argparse.Namespace,
    args: EditingArguments,
    requests: Any,
    corpus: Any,
    state_dir: Path | None,
    output_dir: Path,
    in_state_dir: bool,
    folders: dict[Path, str],
    replaced: dict[Path, bool],
) -> dict[str, Any]:
    """The body of [`run_edit`] once its arguments are checked (under the state's lock)."""
    from ..editor import Editor
    from ..editor_state import is_state_dir
    from ..export import EDIT_METRICS_NAME, read_edits_metadata, remove_artefact_files, write_json
    from ..redaction import redact

    model, tokenizer = load_model(namespace.model, args)
    continued = state_dir is not None and is_state_dir(state_dir)
    if continued:
        editor = Editor.from_state(model, state_dir, args=args, processing_class=tokenizer, stats_dataset=corpus)
    else:
        editor = Editor(model, args=args, processing_class=tokenizer, stats_dataset=corpus)
    output = editor.edit(requests)
    resolved = editor.resolved_args.to_dict()
    metrics = dict(output.metrics)
    if namespace.evaluate:
        metrics.update(editor.evaluate(requests))
        output.metadata["batch"]["metrics"] = dict(metrics)  # the model card shows the evaluation
    output.metadata["batch"]["source"] = {
        "requests": str(namespace.requests),
        "corpus": [str(p) for p in corpus or []],
    }

    if editor.state.is_main_process:  # `--overwrite_output_dir`: the other kind goes before the new files come
        for folder, new in folders.items():
            if replaced[folder]:
                removed = remove_artefact_files(folder, "adapter" if new == "checkpoint" else "checkpoint")
                print(f"  removed {', '.join(removed)} from {folder} (--overwrite_output_dir)")
    report = None
    if state_dir is not None:
        report = editor.save_state(state_dir)
    if namespace.merged:
        editor.merge_and_save(output_dir, repo_id=args.hub_model_id)
        written = "the edited checkpoint"
    elif not in_state_dir:
        report = editor.save_adapter(output_dir, export_rank=namespace.export_rank, repo_id=args.hub_model_id)
    held = editor.edit_metadata(include_requests=False)  # consolidated batches (`--keep_history`) included
    summary = {"metrics": metrics, "args": redact(resolved), "num_requests": len(output.requests),
               "num_edits_total": held["num_edits"], "num_batches": len(held["batches"])}  # fmt: skip
    if not editor.state.is_main_process:  # under `accelerate launch`: the main process wrote the files and reports
        return summary
    if not namespace.merged:
        metrics["adapter_bytes"] = report.adapter_bytes
        metrics["adapter_max_reconstruction_error"] = report.max_reconstruction_error
        written = f"the adapter ({report.adapter_bytes / 1e6:.2f} MB, ranks {sorted(set(report.ranks.values()))})"
    write_json(output_dir / EDIT_METRICS_NAME, jsonable(summary))

    name = namespace.model or getattr(model.config, "_name_or_path", None)
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
    if namespace.evaluate:
        print(
            f"  efficacy {metrics['efficacy_success']:.1f}  paraphrase {metrics['paraphrase_success']:.1f}  "
            f"neighborhood {metrics['neighborhood_success']:.1f}  score {metrics['score']:.1f}"
        )
    print(f"  wrote {written} and edit_metrics.json to {output_dir}")
    if args.push_to_hub:
        from ..hub import push_folder

        # Exactly what this run wrote (the export lists its files in memit_edits.json), nothing else in the folder.
        files = [*read_edits_metadata(output_dir)["files"], EDIT_METRICS_NAME]
        commit = push_folder(
            output_dir, args.hub_model_id, args.hub_private_repo, args.hub_token,
            f"Add {len(output.requests)} fact edits with memit-hf", files=files,
        )  # fmt: skip
        print(f"  pushed to {args.hub_model_id}: {getattr(commit, 'commit_url', commit)}")
    return summary


def run_stats(namespace: argparse.Namespace, args: EditingArguments) -> dict[str, int]:
    """`memit-hf stats`: compute or load the statistics of `args.layers` (default: the model's edited layers); with
    `--push_to_hub`, upload them with a card to the Hub dataset repository `--hub_model_id` (main process only)."""
    from ..editor import Editor

    if args.push_to_hub and not args.hub_model_id:
        raise SystemExit("memit-hf stats: error: --push_to_hub needs a repository: --push_to_hub REPO.")
    corpus = corpus_paths(namespace.corpus)
    model, tokenizer = load_model(namespace.model, args)
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
    main = editor.statistics.state.is_main_process
    if main:
        print(f"Statistics of {len(statistics)} modules from {source} in {seconds:.1f}s, cached in {cache_dir}:")
        for name, layer in statistics.items():
            dim = layer.moment.total.shape[0]
            print(f"  {name}: {layer.count} tokens, dim {dim} ({layer.source}, key {layer.key})")
    if args.push_to_hub and main:
        from ..statistics import push_statistics

        commit = push_statistics(
            args.hub_model_id, [layer.fingerprint for layer in statistics.values()], editor.statistics.cache,
            private=args.hub_private_repo, token=args.hub_token,
        )  # fmt: skip
        print(f"  pushed to the dataset repository {args.hub_model_id}: {getattr(commit, 'commit_url', commit)}")
    return {name: layer.count for name, layer in statistics.items()}
