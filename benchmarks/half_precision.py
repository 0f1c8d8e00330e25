"""Editing SmolLM2-135M-Instruct in bfloat16 against float32, on the same CounterFact records.

For each setting it edits the first n records at once with the library defaults and reports ES / PS / NS (edited and
unedited), the rounding error of the in-place merge (`merge_rounding_error`: the share of the update lost when
`W + Delta` is stored in the weight's dtype), the residual diagnostic and the time. The settings:

- `float32`: the model in float32, updates merged in place;
- `bfloat16`: the model in bfloat16 (statistics, keys and solves still in float32/float64), updates merged in place;
- `bfloat16-hooks`: the same with `merge_edits=False`: the weights stay untouched and the exact float32 update is
  added to each edited module's output (like an un-merged LoRA adapter).

    python benchmarks/half_precision.py --num-edits 100 --output benchmarks/results/half_precision.json
"""

import argparse
import time

import common


SETTINGS = {
    "float32": ("float32", True),
    "bfloat16": ("bfloat16", True),
    "bfloat16-hooks": ("bfloat16", False),
}
METRICS = {"efficacy_success": "ES", "paraphrase_success": "PS", "neighborhood_success": "NS"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(common.SHARED / "counterfact.jsonl"), help="CounterFact records.")
    parser.add_argument("--num-edits", type=int, default=100)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--corpus", nargs="+", default=common.WIKITEXT, help="Statistics corpus files.")
    parser.add_argument("--stats-tokens", type=int, default=408_567)
    parser.add_argument("--stats-cache-dir", default=None, help="Statistics cache (default: a fresh folder).")
    parser.add_argument("--device", default=None)
    parser.add_argument("--output", default=str(common.REPO / "benchmarks" / "results" / "half_precision.json"))
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    options = parse_args(argv)
    common.setup()
    import tempfile

    import torch

    from memit_hf import EditingArguments, Editor, load_requests

    device = options.device or common.default_device()
    requests = load_requests(options.data)[: options.num_edits]
    cache = options.stats_cache_dir or tempfile.mkdtemp(prefix="memit-stats-")
    results = {
        "benchmark": "half_precision",
        "machine": common.machine(device),
        "num_edits": len(requests),
        "runs": {},
    }
    for name in options.settings:
        dtype, merge = SETTINGS[name]
        model, tokenizer = common.load_model(device)
        model = model.to(getattr(torch, dtype))
        args = EditingArguments(stats_num_tokens=options.stats_tokens, stats_cache_dir=cache, merge_edits=merge)
        editor = Editor(model, args=args, processing_class=tokenizer, stats_dataset=options.corpus)
        tick = time.perf_counter()
        editor.get_statistics(editor.resolved_args.layers)
        statistics_seconds = time.perf_counter() - tick
        tick = time.perf_counter()
        output = editor.edit(requests)
        run = {
            "dtype": dtype,
            "merge_edits": merge,
            "statistics_seconds": statistics_seconds,
            "edit_seconds": time.perf_counter() - tick,
            **{key: output.metrics[key] for key in ("merge_rounding_error", "residual_achieved", "z_mean_steps")},
            **editor.evaluate(requests),
        }
        results["runs"][name] = run
        print(
            name,
            {key: run[key] for key in ("merge_rounding_error", *METRICS, *(f"pre_{m}" for m in METRICS))},
            flush=True,
        )
        common.write_json(options.output, results)
    print()
    print("| setting | ES | PS | NS | unedited ES / PS / NS | merge rounding error | residual | edit s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, run in results["runs"].items():
        pre = " / ".join(f"{run[f'pre_{key}']:.1f}" for key in METRICS)
        print(
            f"| {name} | {run['efficacy_success']:.1f} | {run['paraphrase_success']:.1f} | "
            f"{run['neighborhood_success']:.1f} | {pre} | {run['merge_rounding_error']:.2e} | "
            f"{run['residual_achieved']:.3f} | {run['edit_seconds']:.0f} |"
        )
    print(f"\nwrote {options.output}")
    return results


if __name__ == "__main__":
    main()
