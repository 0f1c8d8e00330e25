"""Time per editing stage against the number of edits, from the runs of `benchmarks/quality_vs_edits.py` or
`benchmarks/z_vs_batch_size.py` (whose runs also hold every z chunk: its requests, iterations, build and total
seconds, printed as a per-chunk table).

Stages, as `Editor.edit` reports them: context templates (sampled once per editor, so only in the first run),
covariance statistics (computed once before the runs, then read from memory), the batched z optimisation, and the
per-layer keys + solves + updates; plus the evaluation (edited and unedited model). It prints a Markdown table,
writes JSON and, with `--plot`, a log-log PNG of the stages that scale with the number of edits.

    python benchmarks/time_per_stage.py --input benchmarks/results/quality_vs_edits.json \\
        --output benchmarks/results/time_per_stage.json --plot benchmarks/results/time_per_stage.png
"""

import argparse
import json
from pathlib import Path

import common


STAGES = {
    "templates_seconds": "templates",
    "statistics_seconds": "statistics",
    "values_seconds": "z optimisation",
    "update_seconds": "keys + solves + updates",
    "total_seconds": "edit total",
    "evaluation_seconds": "evaluation",
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    results = common.REPO / "benchmarks" / "results"
    parser.add_argument("--input", default=str(results / "quality_vs_edits.json"), help="quality_vs_edits.py JSON.")
    parser.add_argument("--output", default=str(results / "time_per_stage.json"))
    parser.add_argument("--plot", default=None, help="Write a PNG here.")
    return parser.parse_args(argv)


def stage_times(quality: dict) -> dict:
    """Per run: the seconds of every stage, and the z optimisation and edit total per edit."""
    rows = []
    for run in quality["runs"]:
        n = run["num_edits"]
        row = {"num_edits": n, **{key: run[key] for key in STAGES if key in run}}
        row.setdefault("total_seconds", run.get("edit_seconds"))
        row["z_seconds_per_edit"] = run["values_seconds"] / n
        row["edit_seconds_per_edit"] = row["total_seconds"] / n
        row["peak_memory_gb"] = run.get("peak_memory_gb")
        row["chunks"] = run.get("chunks", [])
        rows.append(row)
    return {
        "benchmark": "time_per_stage",
        "source": quality.get("benchmark"),
        "machine": quality.get("machine"),
        "statistics": quality.get("statistics"),
        "runs": rows,
    }


def table(times: dict) -> str:
    fmt = common.fmt
    header = ["edits", *STAGES.values(), "z s / edit", "edit s / edit", "peak GB"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in times["runs"]:
        cells = [str(row["num_edits"]), *(fmt(row.get(key), 1) for key in STAGES)]
        cells += [
            fmt(row["z_seconds_per_edit"], 3),
            fmt(row["edit_seconds_per_edit"], 3),
            fmt(row["peak_memory_gb"], 2),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    chunked = [row for row in times["runs"] if row.get("chunks")]
    if chunked:
        lines += [
            "",
            "| edits | chunk | requests | iterations | build s | total s | s / request |",
            "|" + " --- |" * 7,
        ]
        for row in chunked:
            for k, chunk in enumerate(row["chunks"]):
                cells = [str(row["num_edits"]), str(k), str(chunk["requests"]), str(chunk["iterations"])]
                cells += [fmt(chunk.get("build_seconds"), 2), fmt(chunk.get("seconds"), 1)]
                cells.append(fmt(chunk["seconds"] / chunk["requests"] if chunk.get("seconds") else None, 2))
                lines.append("| " + " | ".join(cells) + " |")
    statistics = times.get("statistics") or {}
    if statistics:
        lines.append(
            f"\nStatistics: {statistics.get('tokens', 0):,} tokens in {statistics.get('seconds', 0.0):.1f} s "
            f"(from cache: {statistics.get('from_cache')}), computed once before the runs."
        )
    return "\n".join(lines)


def plot(times: dict, path: str) -> None:
    plt = common.pyplot()
    sizes = [row["num_edits"] for row in times["runs"]]
    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    for key in ("values_seconds", "update_seconds", "total_seconds", "evaluation_seconds"):
        values = [row.get(key) for row in times["runs"]]
        if all(value is not None and value > 0 for value in values):
            axis.plot(sizes, values, "o-", label=STAGES[key])
    axis.set(xscale="log", yscale="log", xlabel="edits applied at once", ylabel="seconds")
    axis.set_xticks(sizes, [str(n) for n in sizes])
    axis.xaxis.set_minor_locator(plt.NullLocator())
    device = (times.get("machine") or {}).get("gpu") or (times.get("machine") or {}).get("cpu", "")
    axis.set_title(f"MEMIT on SmolLM2-135M: time per stage ({device})", fontsize="medium")
    axis.grid(alpha=0.3, which="both")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> dict:
    options = parse_args(argv)
    quality = json.loads(Path(options.input).read_text(encoding="utf-8"))
    times = stage_times(quality)
    common.write_json(options.output, times)
    print(table(times))
    if options.plot:
        plot(times, options.plot)
    print(f"\nwrote {options.output}" + (f" and {options.plot}" if options.plot else ""))
    return times


if __name__ == "__main__":
    main()
