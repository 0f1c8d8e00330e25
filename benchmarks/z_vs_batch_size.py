"""z cost per edit against the number of edits in one `edit()` call, with the quality of each edit, and the latency
of a one-fact edit.

For each n of `--num-edits` (default 1 10 30 100 300) the first n CounterFact records are edited at once with one
editor (statistics from the cache, context templates sampled once before the runs; the model restored after each
run), and it reports the seconds of every stage, the z optimisation per edit (and its ratio to that of 100 edits and to
the MEMIT reference's per-edit time on this CPU), the chunk plan with each chunk's requests, steps and seconds,
teacher-forced ES / PS / NS and the greedy figures of the `generative` family (plain prompts, on the first
`--greedy-records` edited records). Then the end-to-end latency of one-fact edits: a fresh `Editor` (templates
sampled, statistics read from the disk cache) editing one fact, and the same editor editing another fact.

    python benchmarks/z_vs_batch_size.py --stats-cache-dir /tmp/bench_stats \\
        --output benchmarks/results/z_vs_batch_size.json
    python benchmarks/z_vs_batch_size.py --num-edits 10 100 --set v_batch_size=32 --no-greedy
    python benchmarks/z_vs_batch_size.py --num-edits 300 --no-latency --append  # one more size, same JSON
"""

import argparse
import json
import time
from pathlib import Path

import common


REFERENCE_SECONDS_PER_EDIT = 15.2
"""The MEMIT reference's z seconds per edit on this project's 2-core CPU (SmolLM2, measured at n = 10, 30 and 100:
15.2-16.2, flat in n; its z loop optimises one request at a time)."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(common.SHARED / "counterfact.jsonl"), help="CounterFact JSONL file.")
    parser.add_argument("--model", default=None, help="A `.gguf` file, folder or Hub id (default: SmolLM2).")
    parser.add_argument("--num-edits", type=int, nargs="+", default=[1, 10, 30, 100, 300])
    common.add_statistics_options(parser)
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="EditingArguments fields, flat.")
    parser.add_argument("--greedy", action=argparse.BooleanOptionalAction, default=True, help="Greedy figures.")
    parser.add_argument("--greedy-records", type=int, default=100, help="Greedy figures on this many edited records.")
    parser.add_argument("--latency", action=argparse.BooleanOptionalAction, default=True, help="One-fact latency.")
    parser.add_argument(
        "--append", action="store_true", help="Keep the runs of other sizes (and the latency) already in --output."
    )
    parser.add_argument("--reference-seconds-per-edit", type=float, default=REFERENCE_SECONDS_PER_EDIT)
    parser.add_argument("--device", default=None, help="`cuda` or `cpu` (default: cuda when available).")
    parser.add_argument("--output", default=str(common.REPO / "benchmarks" / "results" / "z_vs_batch_size.json"))
    return parser.parse_args(argv)


def chunk_profile(values) -> list[dict]:
    """Per chunk optimised: its requests, iterations, steps per request and seconds (when the result has them)."""
    seconds = getattr(values, "chunk_seconds", None) or [None] * len(values.chunks)
    build = getattr(values, "chunk_build_seconds", None) or [None] * len(values.chunks)
    return [
        {
            "requests": len(members),
            "iterations": len(schedule),
            "mean_steps": float(values.steps[members].float().mean()),
            "seconds": total,
            "build_seconds": built,
        }
        for members, schedule, total, built in zip(values.chunks, values.schedule, seconds, build)
    ]


def run_size(editor, requests, options) -> dict:
    """Edit `requests` at once, evaluate, restore; the run's figures."""
    from memit_hf.evaluation.generative import evaluate_generative

    tick = time.perf_counter()
    output = editor.edit(requests)
    seconds = time.perf_counter() - tick
    n = len(requests)
    run = {
        "num_edits": n,
        "edit_seconds": seconds,
        **{key: output.metrics[key] for key in ("templates_seconds", "statistics_seconds", "values_seconds")},
        "update_seconds": output.metrics["update_seconds"],
        "z_seconds_per_edit": output.metrics["values_seconds"] / n,
        "mean_steps": float(output.values.steps.float().mean()),
        "chunks": chunk_profile(output.values),
    }
    run.update(editor.evaluate(requests, include_pre=False))
    if options.greedy:
        sample = requests[: options.greedy_records]
        greedy = evaluate_generative(editor.model, editor.tokenizer, sample, unedited=editor.unedited, chat=False)
        run.update({key: value for key, value in greedy.items() if not key.startswith("chat_")})
        run["greedy_records"] = len(sample)
    editor.restore()
    return run


def one_fact_latency(model, tokenizer, args, corpus, records) -> dict:
    """A fresh editor's first one-fact edit (templates sampled, statistics read from the cache) and its second."""
    from memit_hf import Editor

    tick = time.perf_counter()
    editor = Editor(model, args=args, processing_class=tokenizer, stats_dataset=corpus)
    first = editor.edit(records[:1])
    cold = time.perf_counter() - tick
    tick = time.perf_counter()
    second = editor.edit(records[1:2])
    warm = time.perf_counter() - tick
    editor.restore()
    return {
        "cold_seconds": cold,
        "cold_stages": {key: first.metrics[key] for key in STAGES},
        "warm_seconds": warm,
        "warm_stages": {key: second.metrics[key] for key in STAGES},
    }


STAGES = ("templates_seconds", "statistics_seconds", "values_seconds", "update_seconds")


def table(results: dict) -> str:
    fmt = common.fmt
    runs = results["runs"]
    # Per-edit cost relative to the 100-edit run (the yardstick), or to the largest run without one.
    base = next((run for run in runs if run["num_edits"] == 100), max(runs, key=lambda run: run["num_edits"]))
    reference = results["reference_seconds_per_edit"]
    header = [
        "edits",
        "chunks",
        "z s",
        "z s / edit",
        f"/ n={base['num_edits']}",
        "reference / ours",
        "steps",
        "keys+solves s",
        "ES",
        "PS",
        "NS",
        "greedy ES",
        "greedy PS",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for run in runs:
        per_edit = run["z_seconds_per_edit"]
        cells = [
            str(run["num_edits"]),
            "+".join(str(chunk["requests"]) for chunk in run["chunks"]),
            fmt(run["values_seconds"], 1),
            fmt(per_edit, 2),
            fmt(per_edit / base["z_seconds_per_edit"], 2),
            fmt(reference / per_edit, 1),
            fmt(run["mean_steps"], 1),
            fmt(run["update_seconds"], 1),
            fmt(run.get("efficacy_success"), 1),
            fmt(run.get("paraphrase_success"), 1),
            fmt(run.get("neighborhood_success"), 1),
            fmt(run.get("gen_efficacy_prefix"), 1),
            fmt(run.get("gen_paraphrase_prefix"), 1),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    latency = results.get("latency")
    if latency:
        lines.append(
            f"\nOne-fact edit, end to end: {latency['cold_seconds']:.1f} s for a fresh editor (templates "
            f"{latency['cold_stages']['templates_seconds']:.1f} s, statistics {latency['cold_stages']['statistics_seconds']:.1f} s, "
            f"z {latency['cold_stages']['values_seconds']:.1f} s, keys + solves {latency['cold_stages']['update_seconds']:.1f} s), "
            f"{latency['warm_seconds']:.1f} s for its second edit (z {latency['warm_stages']['values_seconds']:.1f} s)."
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    options = parse_args(argv)
    common.setup()
    from memit_hf import EditingArguments, Editor, load_requests

    device = options.device or common.default_device()
    model, tokenizer = common.load_model(device, options.model)
    flat = {**common.statistics_arguments(options), **common.parse_settings(options.set)}
    args = EditingArguments.from_flat(flat)
    records, corpus = load_requests(options.data), common.corpus_option(options.corpus)
    editor = Editor(model, args=args, processing_class=tokenizer, stats_dataset=corpus)
    editor.get_statistics(editor.resolved_args.layers)  # collected or read once, before the timed runs
    templates = editor.context_templates  # sampled once, before the timed runs
    results = {
        "benchmark": "z_vs_batch_size",
        "data": options.data,
        "machine": common.machine(device),
        "settings": flat,
        "args": editor.resolved_args.to_dict(),
        "reference_seconds_per_edit": options.reference_seconds_per_edit,
        "context_templates": templates,
        "runs": common.previous_runs(options.output, options.append, set(options.num_edits)),
    }
    if options.append and not options.latency and Path(options.output).exists():
        results["latency"] = json.loads(Path(options.output).read_text(encoding="utf-8")).get("latency")
    for n in options.num_edits:
        run = run_size(editor, records[:n], options)
        results["runs"].append(run)
        results["runs"].sort(key=lambda entry: entry["num_edits"])
        print({key: run[key] for key in ("num_edits", "values_seconds", "z_seconds_per_edit")}, flush=True)
        common.write_json(options.output, results)
    if options.latency:
        results["latency"] = one_fact_latency(model, tokenizer, args, corpus, records)
    common.write_json(options.output, results)
    print(table(results))
    return results


if __name__ == "__main__":
    main()
