"""Statistics throughput: tokens per second of the second-moment collection with 1, 2, ... processes, against a bare
forward over the same batches.

For each process count the script launches itself under `torch.distributed.run` (what `accelerate launch` runs for
several processes; on a CPU-only machine the processes use gloo, on GPUs one GPU each). Every process loads
SmolLM2-135M-Instruct, tokenizes the corpus, then times (1) a bare forward over its own share of the batches, stopped
right before the last edited module as the collection is, and (2) `collect_second_moments` over all of them (its
share, the Gram sums and the final reduction). The wall time of a stage is the slowest process's. It prints a table
and writes JSON.

    python benchmarks/statistics_throughput.py --processes 1 2 \\
        --output benchmarks/results/statistics_throughput.json
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="Process counts to measure.")
    parser.add_argument("--corpus", nargs="+", default=common.WIKITEXT, help="Statistics corpus (text files).")
    parser.add_argument(
        "--stats-tokens", type=int, default=408_567, help="Token budget (all of wikitext-2 valid+test)."
    )
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 4, 5, 6, 7])
    parser.add_argument("--batch-tokens", type=int, default=4096, help="`stats_batch_tokens`.")
    parser.add_argument("--max-length", type=int, default=512, help="`stats_max_length`.")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--output", default=str(common.REPO / "benchmarks" / "results" / "statistics_throughput.json"))
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: write this process's result
    return parser.parse_args(argv)


def worker(options: argparse.Namespace) -> None:
    """One process of a launch: time the bare forward over its share, then the collection; the main process writes
    the slowest process's times."""
    import torch
    from accelerate.utils import gather_object

    from memit_hf import EditingArguments, Editor
    from memit_hf.distributed import owned_chunks, process_state
    from memit_hf.models import load_default_model
    from memit_hf.statistics import collect_second_moments, pack_batches
    from memit_hf.tokenization import pad_batch, pad_token_id
    from memit_hf.tracing import capture, run_until_stopped

    state = process_state()
    model, tokenizer = load_default_model(getattr(torch, options.dtype))
    model = model.to(state.device)
    args = EditingArguments(
        layers=options.layers,
        stats_num_tokens=options.stats_tokens,
        stats_max_length=options.max_length,
        stats_batch_tokens=options.batch_tokens,
        stats_cache_dir=tempfile.mkdtemp(),
    )
    editor = Editor(model, args=args, processing_class=tokenizer, stats_dataset=options.corpus)
    pieces = editor.statistics.corpus_pieces()
    names = [editor.layout.edit_name(layer) for layer in options.layers]
    batches = pack_batches(pieces, options.batch_tokens)
    mine = owned_chunks(len(batches), state)
    pad = pad_token_id(tokenizer)

    def synchronize():
        if state.device.type == "cuda":
            torch.cuda.synchronize(state.device)
        state.wait_for_everyone()

    with torch.no_grad():  # warm-up: one batch through both paths
        input_ids, mask = pad_batch(batches[-1], pad, model.device)
        with capture(model, stop_before=names[-1]):
            run_until_stopped(lambda: model(input_ids=input_ids, attention_mask=mask, use_cache=False))
    synchronize()
    tick = time.perf_counter()
    with torch.no_grad():
        for index in mine:
            input_ids, mask = pad_batch(batches[index], pad, model.device)
            with capture(model, stop_before=names[-1]):
                run_until_stopped(
                    lambda ids=input_ids, m=mask: model(input_ids=ids, attention_mask=m, use_cache=False)
                )
    if state.device.type == "cuda":
        torch.cuda.synchronize(state.device)
    bare = time.perf_counter() - tick
    synchronize()
    tick = time.perf_counter()
    moments = collect_second_moments(model, tokenizer, names, pieces, options.batch_tokens, show_progress=False)
    collection = time.perf_counter() - tick
    timings = gather_object([(bare, collection)]) if state.num_processes > 1 else [(bare, collection)]
    if state.is_main_process:
        result = {
            "processes": state.num_processes,
            "device": str(state.device.type),
            "threads_per_process": torch.get_num_threads(),
            "tokens": next(iter(moments.values())).count,
            "padded_tokens": sum(len(batch) * len(batch[0]) for batch in batches),
            "batches": len(batches),
            "bare_forward_seconds": max(t[0] for t in timings),
            "collection_seconds": max(t[1] for t in timings),
            "per_process": [{"bare_forward_seconds": t[0], "collection_seconds": t[1]} for t in timings],
        }
        Path(options.worker).write_text(json.dumps(result), encoding="utf-8")
    state.wait_for_everyone()


def launch(options: argparse.Namespace, processes: int) -> dict:
    """Run the worker under `torch.distributed.run` with `processes` processes; its result."""
    with tempfile.TemporaryDirectory() as folder:
        result = Path(folder) / "result.json"
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={processes}",
            __file__,
            "--worker",
            str(result),
            "--corpus",
            *options.corpus,
            "--stats-tokens",
            str(options.stats_tokens),
            "--layers",
            *map(str, options.layers),
            "--batch-tokens",
            str(options.batch_tokens),
            "--max-length",
            str(options.max_length),
            "--dtype",
            options.dtype,
        ]
        subprocess.run(command, check=True)
        return json.loads(result.read_text(encoding="utf-8"))


def main(argv=None) -> None:
    options = parse_args(argv)
    common.setup()
    if options.worker:
        worker(options)
        return
    options.corpus = common.corpus_option(options.corpus)
    if options.corpus is None:
        raise SystemExit("statistics_throughput.py measures a real corpus: pass text files to --corpus.")
    import torch

    runs = []
    for processes in options.processes:
        run = launch(options, processes)
        run["collection_tokens_per_second"] = run["tokens"] / run["collection_seconds"]
        run["bare_forward_tokens_per_second"] = run["tokens"] / run["bare_forward_seconds"]
        run["fraction_of_bare_forward_speed"] = run["bare_forward_seconds"] / run["collection_seconds"]
        runs.append(run)
        print(json.dumps(run), flush=True)
    results = {
        "model": f"SmolLM2-135M-Instruct ({options.dtype})",
        "machine": common.machine(common.default_device()),
        "torch": torch.__version__,
        "settings": {
            "layers": options.layers,
            "stats_tokens": options.stats_tokens,
            "batch_tokens": options.batch_tokens,
            "max_length": options.max_length,
            "corpus": [Path(c).name for c in options.corpus or []],
        },
        "runs": runs,
    }
    common.write_json(options.output, results)
    print(
        "\n| processes | device | threads/process | tokens | collection s | tokens/s | bare forward s | bare tokens/s "
        "| fraction of bare speed |\n|---|---|---|---|---|---|---|---|---|"
    )
    for run in runs:
        print(
            f"| {run['processes']} | {run['device']} | {run['threads_per_process']} | {run['tokens']:,} | "
            f"{run['collection_seconds']:.1f} | {run['collection_tokens_per_second']:,.0f} | "
            f"{run['bare_forward_seconds']:.1f} | {run['bare_forward_tokens_per_second']:,.0f} | "
            f"{run['fraction_of_bare_forward_speed']:.2f} |"
        )


if __name__ == "__main__":
    main()
