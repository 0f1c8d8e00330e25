"""Peak memory of an edit against the number of requests, on SmolLM2-135M-Instruct.

Each size runs in a fresh process (peak resident memory is per process; on CUDA the peak allocated memory is read
instead). A run loads the model, loads the statistics (from `--stats-cache-dir`, collected there first if missing),
computes the target values, and edits; it reports the peak memory after loading, after the z optimisation and after
the edit (keys, solves, updates), so the growth of each stage with n shows.

The z optimisation is what makes large n slow on a CPU, and its memory is one chunk's whatever n is: with
`--z-steps 1` (the default here) every request takes a single forward (the targets then equal the current outputs,
and a fixed random direction of 0.1 times their norm is added so that the solves have something to write), which
measures the memory of every stage at a fraction of a real edit's time. Use `--z-steps 25` for real targets.

    python benchmarks/memory_vs_edits.py --num-edits 100 1000 10000 --output benchmarks/results/memory_vs_edits.json
"""

import argparse
import json
import os
import subprocess
import sys
import time

import common


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data",
        nargs="+",
        default=[str(common.SHARED / f"counterfact_easyedit_{split}.jsonl") for split in ("edit", "train")],
        help="Request files, read in order until there are enough records.",
    )
    parser.add_argument("--num-edits", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--z-steps", type=int, default=1, help="z iterations per request (1: a forward only).")
    parser.add_argument("--corpus", nargs="+", default=common.WIKITEXT, help="Statistics corpus files.")
    parser.add_argument("--stats-tokens", type=int, default=408_567)
    parser.add_argument("--stats-cache-dir", default=None, help="Statistics cache (default: a fresh folder).")
    parser.add_argument("--device", default=None)
    parser.add_argument("--output", default=str(common.REPO / "benchmarks" / "results" / "memory_vs_edits.json"))
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def child(options: argparse.Namespace) -> dict:
    """One size, in this process: the peak memory after each stage."""
    common.setup()
    import torch

    from memit_hf import EditingArguments, Editor, load_requests

    device = options.device or common.default_device()
    records = []
    for path in options.data:
        records.extend(load_requests(path))
        if len(records) >= options.child:
            break
    requests = records[: options.child]
    if len(requests) < options.child:
        raise SystemExit(f"only {len(requests)} records in {options.data}")
    model, tokenizer = common.load_model(device)
    args = EditingArguments(
        stats_num_tokens=options.stats_tokens,
        stats_cache_dir=options.stats_cache_dir,
        v_num_grad_steps=options.z_steps,
    )
    editor = Editor(model, args=args, processing_class=tokenizer, stats_dataset=options.corpus)
    editor.get_statistics(editor.resolved_args.layers)
    assert editor.context_templates  # sampled before the measurement
    common.reset_peak_memory(device)
    loaded = common.peak_memory_gb(device)
    tick = time.perf_counter()
    values = editor.compute_values(requests)
    if options.z_steps == 1:
        generator = torch.Generator().manual_seed(0)
        direction = torch.randn(values.targets.shape, generator=generator)
        scale = values.initial.norm(dim=1, keepdim=True) / direction.norm(dim=1, keepdim=True)
        values.targets = values.initial + 0.1 * scale * direction
    z_seconds = time.perf_counter() - tick
    after_z = common.peak_memory_gb(device)
    tick = time.perf_counter()
    output = editor.edit(requests, values=values)
    return {
        "num_edits": options.child,
        "z_steps": options.z_steps,
        "loaded_gb": loaded,
        "after_z_gb": after_z,
        "after_edit_gb": common.peak_memory_gb(device),
        "z_seconds": z_seconds,
        "edit_seconds": time.perf_counter() - tick,
        "update_seconds": output.metrics["update_seconds"],
        "machine": common.machine(device),
    }


def main(argv=None) -> dict:
    options = parse_args(argv)
    if options.child is not None:
        print("RESULT " + json.dumps(child(options)), flush=True)
        return {}
    common.setup()
    import tempfile

    cache = options.stats_cache_dir or tempfile.mkdtemp(prefix="memit-stats-")
    runs = []
    for n in options.num_edits:
        command = [
            sys.executable,
            __file__,
            "--child",
            str(n),
            "--z-steps",
            str(options.z_steps),
            "--stats-cache-dir",
            cache,
            "--stats-tokens",
            str(options.stats_tokens),
            "--data",
            *options.data,
            "--corpus",
            *options.corpus,
        ] + (["--device", options.device] if options.device else [])
        done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            raise SystemExit(f"size {n} failed:\n{done.stderr[-3000:]}")
        runs.append(json.loads(lines[-1].removeprefix("RESULT ")))
        print(json.dumps(runs[-1]), flush=True)
    results = {"benchmark": "memory_vs_edits", "data": options.data, "runs": runs}
    common.write_json(options.output, results)
    print()
    print("| edits | after loading GB | after z GB | after edit GB | z s | keys+solves s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for run in runs:
        print(
            f"| {run['num_edits']} | {run['loaded_gb']:.2f} | {run['after_z_gb']:.2f} | {run['after_edit_gb']:.2f} | "
            f"{run['z_seconds']:.1f} | {run['update_seconds']:.1f} |"
        )
    print(f"\nwrote {options.output}")
    return results


if __name__ == "__main__":
    main()
