"""`memit-hf evaluate`: (optionally edit, then) evaluate, and write JSON and a Markdown table."""

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..arguments import EditingArguments
from .common import corpus_paths, jsonable, load_model
from .parsing import command_parser, corpus_field, model_field


if TYPE_CHECKING:
    from transformers import HfArgumentParser


EVALUATION_CHOICES = ("counterfact", "zsre", "generation", "generative", "wild", "multihop", "perplexity")
"""`--metrics` choices of `memit-hf evaluate` (`memit_hf.evaluation.EVALUATION_METRICS`, kept here so that `--help`
imports no torch)."""


@dataclass
class EvaluateScriptArguments:
    """The options of `memit-hf evaluate` besides its [`EditingArguments`] (used with `--edit`).

    Args:
        requests (`str`): JSON or JSONL file of requests.
        model (`str`, *optional*): model directory, Hub id or `.gguf` file (`None`: the embedded SmolLM2).
        corpus (`list[str]`, *optional*): plain-text files for the covariance statistics (with `edit`).
        metrics (`list[str]`, *optional*, defaults to `["counterfact"]`): metric families, from
            [`EVALUATION_CHOICES`].
        edit (`bool`, *optional*, defaults to `False`): edit the model with the requests before evaluating.
        adapter (`str`, *optional*): evaluate the model with this edit adapter loaded.
        num_requests (`int`, *optional*): use only the first this many requests.
        perplexity_corpus (`list[str]`, *optional*): held-out text files whose perplexity is reported.
        perplexity_tokens (`int`, *optional*): token budget of the perplexity.
        batch_size (`int`, *optional*, defaults to `64`): sequences per forward pass.
    """

    requests: str = field(
        metadata={
            "help": "JSON or JSONL file of requests (canonical, CounterFact, EasyEdit, zsRE or MQuAKE records).",
            "metavar": "FILE",
        }
    )
    model: str | None = model_field()
    corpus: list[str] | None = corpus_field()
    metrics: list[str] = field(
        default_factory=lambda: ["counterfact"],
        metadata={
            "help": "Metric families: `counterfact` and `zsre` (teacher-forced), `generation` (sampled-text "
            "fluency), `generative` (greedy answers, plain and through the chat template), `wild` (free answers to "
            "questions in a task context, exact match), `multihop` (MQuAKE questions); `perplexity` needs "
            "--perplexity-corpus (which adds it).",
            "choices": EVALUATION_CHOICES,
        },
    )
    edit: bool = field(default=False, metadata={"help": "Edit the model with the requests before evaluating."})
    adapter: str | None = field(
        default=None,
        metadata={
            "help": "Evaluate the model with this edit adapter loaded (peft); the unedited figures come from the "
            "model with the adapter switched off.",
            "metavar": "DIR_OR_REPO",
        },
    )
    num_requests: int | None = field(default=None, metadata={"help": "Use only the first N requests.", "metavar": "N"})
    perplexity_corpus: list[str] | None = field(
        default=None,
        metadata={
            "help": "Held-out text files whose perplexity is reported (documents separated by blank lines).",
            "metavar": "FILE",
        },
    )
    perplexity_tokens: int | None = field(
        default=None, metadata={"help": "Token budget of the perplexity.", "metavar": "N"}
    )
    batch_size: int = field(default=64, metadata={"help": "Sequences per forward pass."})


def make_parser(subparsers: Any | None = None) -> "HfArgumentParser":
    """The parser of `memit-hf evaluate` (a subcommand of `subparsers`, or stand-alone): [`EvaluateScriptArguments`]
    and [`EditingArguments`]."""
    return command_parser(
        subparsers,
        "evaluate",
        [EvaluateScriptArguments, EditingArguments],
        help_text="Evaluate a model on requests (CounterFact, zsRE, generation, generative, wild, multi-hop, "
        "perplexity); write JSON and Markdown.",
        description="Evaluate the model on the requests, optionally after editing it with them (`--edit`: the "
        "unedited figures are reported beside the edited ones), and write `evaluation.json` and `evaluation.md` to "
        "--output-dir.",
    )


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
    ("efficacy", "efficacy_success", "gen_efficacy_prefix", "chat_efficacy_contains", "wild_efficacy_exact"),
    ("efficacy, answer contains", None, "gen_efficacy_contains", None, "wild_efficacy_contains"),
    ("paraphrase", "paraphrase_success", "gen_paraphrase_prefix", "chat_paraphrase_contains", "wild_paraphrase_exact"),
    (
        "neighborhood kept",
        "neighborhood_success",
        "gen_neighborhood_first_word",
        "chat_neighborhood_unchanged",
        "wild_neighborhood_unchanged",
    ),
    ("neighborhood bleed", None, "gen_neighborhood_bleed", "chat_neighborhood_bleed", "wild_neighborhood_bleed"),
    ("multi-hop", "multihop_success", "gen_multihop_accuracy", "chat_multihop_accuracy", None),
)
"""Rows of [`comparison_table`]: `(row, teacher-forced key, greedy key, chat key, wild key)`, `None` where no metric
fits."""


def comparison_table(metrics: dict[str, float]) -> str:
    """A Markdown table putting the teacher-forced, greedy, chat and wild figures of the same question side by side.

    Each cell shows the edited figure, preceded by the unedited one (`unedited -> edited`) when the `pre_*` figures
    are present. Rows whose metrics are all absent are left out. Teacher-forced: `*_success` (P(new) > P(true), or
    for neighbors P(true) > P(new); multi-hop: P(new answer) > P(old answer)); greedy: the continuation starts with
    the new object (neighborhood: same first word as the unedited model; bleed: names the new object; multi-hop:
    the answer names the new answer or an alias); chat: the assistant's answer names the new object (neighborhood:
    identical to the unedited model's answer); wild: the answer to the question, asked in a task context, is exactly
    the new object (or contains it, on the `efficacy, answer contains` row; neighborhood: the same answer as the
    unedited model's).

    Args:
        metrics (`dict[str, float]`): the output of [`Editor.evaluate`] with the `"generative"`, `"wild"` or
            `"multihop"` families.

    Returns:
        `str`: the table ending with a newline, or `""` when `metrics` has no greedy, chat or wild figure.
    """
    rows = [row for row in COMPARISON_ROWS if any(key in metrics for key in row[2:])]
    if not rows:
        return ""
    lines = ["| | teacher-forced | greedy | chat | wild |", "| --- | --- | --- | --- | --- |"]
    for name, *keys in rows:
        lines.append(f"| {name} | " + " | ".join(_comparison_cell(metrics, key) for key in keys) + " |")
    return "\n".join(lines) + "\n"


def _comparison_cell(metrics: dict[str, float], key: str | None) -> str:
    if key is None or key not in metrics:
        return ""
    pre = metrics.get(f"pre_{key}")
    return _cell(metrics[key]) if pre is None else f"{_cell(pre)} -> {_cell(metrics[key])}"


def main(script_args: EvaluateScriptArguments, editing_args: EditingArguments | None = None) -> dict[str, Any]:
    """`memit-hf evaluate`: (optionally edit, then) evaluate, and write `evaluation.json` and `evaluation.md`.

    Args:
        script_args ([`EvaluateScriptArguments`]): the command's options.
        editing_args ([`EditingArguments`], *optional*): the arguments of the edit and of `--output_dir` (default:
            the defaults).

    Returns:
        `dict[str, Any]`: the summary written to `evaluation.json`.
    """
    from ..editor import Editor
    from ..requests import load_requests

    args = editing_args if editing_args is not None else EditingArguments()
    if args.output_dir is None:
        raise SystemExit("memit-hf evaluate: error: --output-dir is required.")
    corpus = corpus_paths(script_args.corpus)
    held_out = [Path(item) for item in script_args.perplexity_corpus or []]
    missing = [str(path) for path in held_out if not path.is_file()]
    if missing:
        raise SystemExit(f"memit-hf evaluate: error: --perplexity-corpus files not found: {missing}")
    requests = load_requests(script_args.requests)
    if script_args.num_requests is not None:
        requests = requests[: script_args.num_requests]
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    if script_args.edit and script_args.adapter:
        raise SystemExit("memit-hf evaluate: error: --edit and --adapter exclude each other.")
    model, tokenizer = load_model(script_args.model, args)
    start = time.perf_counter()
    options = dict(
        batch_size=script_args.batch_size,
        metrics=script_args.metrics,
        perplexity_texts=held_out or None,
        perplexity_num_tokens=script_args.perplexity_tokens,
    )
    edit_metrics, editor = None, None
    if script_args.adapter:
        from ..evaluation import evaluate_model
        from ..loading import load_edits

        model = load_edits(model, script_args.adapter)
        metrics = evaluate_model(model, tokenizer, requests, unedited=model.disable_adapter, **options)
        with model.disable_adapter():
            pre = evaluate_model(model, tokenizer, requests, **options)
        metrics.update({f"pre_{key}": value for key, value in pre.items()})
    else:
        editor = Editor(model, args=args, processing_class=tokenizer, stats_dataset=corpus)
        edit_metrics = editor.edit(requests).metrics if script_args.edit else None
        start = time.perf_counter()
        metrics = editor.evaluate(requests, **options)
    summary = {
        "model": script_args.model or getattr(model.config, "_name_or_path", None),
        "requests": str(script_args.requests),
        "num_requests": len(requests),
        "edited": bool(script_args.edit or script_args.adapter),
        "adapter": script_args.adapter,
        "metrics": metrics,
        "evaluation_seconds": time.perf_counter() - start,
        "edit_metrics": edit_metrics,
        "args": editor.resolved_args.to_dict() if script_args.edit and editor is not None else None,
        "perplexity_corpus": [str(path) for path in held_out] or None,
    }
    (output_dir / "evaluation.json").write_text(json.dumps(jsonable(summary), indent=2) + "\n", encoding="utf-8")
    table = markdown_table(metrics)
    comparison = comparison_table(metrics)
    if comparison:
        table = f"{comparison}\n{table}"
    heading = f"Evaluation of {summary['model']} on {len(requests)} requests from {script_args.requests}"
    (output_dir / "evaluation.md").write_text(f"# {heading}\n\n{table}", encoding="utf-8")
    note = (
        " (edited with them)"
        if script_args.edit
        else f" (with the adapter {script_args.adapter})"
        if script_args.adapter
        else ""
    )
    print(f"{heading}{note}:\n")
    print(table)
    print(f"wrote {output_dir / 'evaluation.json'} and evaluation.md")
    return summary
