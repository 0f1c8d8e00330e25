"""`memit-hf evaluate`: (optionally edit, then) evaluate, and write JSON and a Markdown table."""

import argparse
import json
import time
from pathlib import Path
from typing import Any

from ..arguments import EditingArguments
from .common import corpus_paths, jsonable, load_model


def markdown_table(metrics: dict[str, float]) -> str:
    """A Markdown table of evaluation metrics: one row per metric, with an `unedited` column beside `edited` when
    the `pre_*` figures are present.

    Args:
        metrics (`dict[str, float]`): the output of [`Editor.evaluate`].

    Returns:
        `str`: the table, ending with a newline.
    """
    names = [key for key in metrics if not key.startswith("pre_")]
    with_pre = any(f"pre_{name}" in metrics for name in names)
    lines = (
        ["| metric | unedited | edited |", "| --- | --- | --- |"]
        if with_pre
        else ["| metric | value |", "| --- | --- |"]
    )
    for name in names:
        cells = [_cell(metrics.get(f"pre_{name}")), _cell(metrics[name])] if with_pre else [_cell(metrics[name])]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


COMPARISON_ROWS = (
    ("efficacy", "efficacy_success", "gen_efficacy_prefix", "chat_efficacy_contains"),
    ("paraphrase", "paraphrase_success", "gen_paraphrase_prefix", "chat_paraphrase_contains"),
    ("neighborhood kept", "neighborhood_success", "gen_neighborhood_first_word", "chat_neighborhood_unchanged"),
    ("neighborhood bleed", None, "gen_neighborhood_bleed", "chat_neighborhood_bleed"),
    ("multi-hop", "multihop_success", "gen_multihop_accuracy", "chat_multihop_accuracy"),
)
"""Rows of [`comparison_table`]: `(row, teacher-forced key, greedy key, chat key)`, `None` where no metric fits."""


def comparison_table(metrics: dict[str, float]) -> str:
    """A Markdown table putting the teacher-forced, greedy and chat figures of the same question side by side.

    Each cell shows the edited figure, preceded by the unedited one (`unedited -> edited`) when the `pre_*` figures
    are present. Rows whose metrics are all absent are left out. Teacher-forced: `*_success` (P(new) > P(true), or
    for neighbors P(true) > P(new); multi-hop: P(new answer) > P(old answer)); greedy: the continuation starts with
    the new object (neighborhood: same first word as the unedited model; bleed: names the new object; multi-hop:
    the answer names the new answer or an alias); chat: the assistant's answer names the new object (neighborhood:
    identical to the unedited model's answer).

    Args:
        metrics (`dict[str, float]`): the output of [`Editor.evaluate`] with the `"generative"` (and `"multihop"`)
            families.

    Returns:
        `str`: the table ending with a newline, or `""` when `metrics` has no greedy or chat figure.
    """
    rows = [row for row in COMPARISON_ROWS if any(key in metrics for key in row[2:])]
    if not rows:
        return ""
    lines = ["| | teacher-forced | greedy | chat |", "| --- | --- | --- | --- |"]
    for name, *keys in rows:
        lines.append(f"| {name} | " + " | ".join(_comparison_cell(metrics, key) for key in keys) + " |")
    return "\n".join(lines) + "\n"


def _comparison_cell(metrics: dict[str, float], key: str | None) -> str:
    if key is None or key not in metrics:
        return ""
    pre = metrics.get(f"pre_{key}")
    return _cell(metrics[key]) if pre is None else f"{_cell(pre)} -> {_cell(metrics[key])}"


def run_evaluate(namespace: argparse.Namespace, args: EditingArguments) -> dict[str, Any]:
    """`memit-hf evaluate`: (optionally edit, then) evaluate, and write `evaluation.json` and `evaluation.md`."""
    from ..editor import Editor
    from ..requests import load_requests

    if args.output_dir is None:
        raise SystemExit("memit-hf evaluate: error: --output-dir is required.")
    corpus = corpus_paths(namespace.corpus)
    held_out = [Path(item) for item in namespace.perplexity_corpus or []]
    missing = [str(path) for path in held_out if not path.is_file()]
    if missing:
        raise SystemExit(f"memit-hf evaluate: error: --perplexity-corpus files not found: {missing}")
    requests = load_requests(namespace.requests)
    if namespace.num_requests is not None:
        requests = requests[: namespace.num_requests]
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    if namespace.edit and namespace.adapter:
        raise SystemExit("memit-hf evaluate: error: --edit and --adapter exclude each other.")
    model, tokenizer = load_model(namespace.model, args)
    start = time.perf_counter()
    options = dict(
        batch_size=namespace.batch_size, metrics=namespace.metrics, perplexity_texts=held_out or None,
        perplexity_num_tokens=namespace.perplexity_tokens,
    )  # fmt: skip
    edit_metrics, editor = None, None
    if namespace.adapter:
        from ..evaluation import evaluate_model
        from ..loading import load_edits

        model = load_edits(model, namespace.adapter)
        metrics = evaluate_model(model, tokenizer, requests, unedited=model.disable_adapter, **options)
        with model.disable_adapter():
            pre = evaluate_model(model, tokenizer, requests, **options)
        metrics.update({f"pre_{key}": value for key, value in pre.items()})
    else:
        editor = Editor(model, args=args, processing_class=tokenizer, stats_dataset=corpus)
        edit_metrics = editor.edit(requests).metrics if namespace.edit else None
        start = time.perf_counter()
        metrics = editor.evaluate(requests, **options)
    summary = {
        "model": namespace.model or getattr(model.config, "_name_or_path", None),
        "requests": str(namespace.requests),
        "num_requests": len(requests),
        "edited": bool(namespace.edit or namespace.adapter),
        "adapter": namespace.adapter,
        "metrics": metrics,
        "evaluation_seconds": time.perf_counter() - start,
        "edit_metrics": edit_metrics,
        "args": editor.resolved_args.to_dict() if namespace.edit and editor is not None else None,
        "perplexity_corpus": [str(path) for path in held_out] or None,
    }
    (output_dir / "evaluation.json").write_text(json.dumps(jsonable(summary), indent=2) + "\n", encoding="utf-8")
    table = markdown_table(metrics)
    comparison = comparison_table(metrics)
    if comparison:
        table = f"{comparison}\n{table}"
    heading = f"Evaluation of {summary['model']} on {len(requests)} requests from {namespace.requests}"
    (output_dir / "evaluation.md").write_text(f"# {heading}\n\n{table}", encoding="utf-8")
    note = (
        " (edited with them)"
        if namespace.edit
        else f" (with the adapter {namespace.adapter})"
        if namespace.adapter
        else ""
    )
    print(f"{heading}{note}:\n")
    print(table)
    print(f"wrote {output_dir / 'evaluation.json'} and evaluation.md")
    return summary
