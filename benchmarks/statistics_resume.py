"""A statistics collection killed mid-run and resumed gives the uninterrupted statistics bit for bit.

Runs `python -m memit_hf.cli stats` on SmolLM2-135M-Instruct three times, each in a fresh process:

1. uninterrupted, into its own cache folder;
2. with `--stats_checkpoint_every N` into a second folder, killed with SIGKILL (no clean-up: what a crashed job or a
   pre-empted node leaves) as soon as its first checkpoint file appears;
3. the same command again, which resumes from that checkpoint and finishes.

It then compares every layer's cached statistics of (3) with (1): the float64 sums `torch.equal`, the token counts
equal. It prints a table and writes JSON.

    python benchmarks/statistics_resume.py --stats-tokens 60000 --output benchmarks/results/statistics_resume.json
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", nargs="+", default=common.WIKITEXT, help="Statistics corpus (text files).")
    parser.add_argument("--stats-tokens", type=int, default=60_000, help="Token budget.")
    parser.add_argument("--checkpoint-every", type=int, default=4, help="`stats_checkpoint_every` (batches).")
    parser.add_argument("--timeout", type=float, default=1800.0, help="Seconds to wait for each run.")
    parser.add_argument("--output", default=str(common.REPO / "benchmarks" / "results" / "statistics_resume.json"))
    return parser.parse_args(argv)


def stats_command(options, cache_dir: Path, checkpoint_every: int | None) -> list[str]:
    command = [sys.executable, "-m", "memit_hf.cli", "stats", "--corpus", *options.corpus]
    command += ["--stats_num_tokens", str(options.stats_tokens), "--stats_cache_dir", str(cache_dir)]
    if checkpoint_every:
        command += ["--stats_checkpoint_every", str(checkpoint_every)]
    return command


def environment() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(common.REPO / "src"), env.get("PYTHONPATH")]))
    return env


def run_to_end(command: list[str], timeout: float) -> float:
    start = time.perf_counter()
    subprocess.run(command, env=environment(), check=True, timeout=timeout, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def run_until_checkpoint(command: list[str], cache_dir: Path, timeout: float) -> tuple[float, list[str]]:
    """Start `command` and SIGKILL it once a checkpoint file is in `cache_dir`; returns the seconds it ran and the
    checkpoint files it left."""
    start = time.perf_counter()
    process = subprocess.Popen(command, env=environment(), stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        while process.poll() is None and time.perf_counter() - start < timeout:
            checkpoints = sorted(p.name for p in cache_dir.glob("*.ckpt"))
            if checkpoints:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                return time.perf_counter() - start, checkpoints
            time.sleep(0.05)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    raise RuntimeError("The collection ended (or timed out) before writing a checkpoint: lower --checkpoint-every.")


def compare(uninterrupted: Path, resumed: Path) -> list[dict]:
    import torch
    from safetensors.torch import load_file

    rows = []
    for path in sorted(uninterrupted.glob("*.safetensors")):
        if path.name.endswith(".spectrum.safetensors"):
            continue
        other = resumed / path.name
        expected, actual = load_file(path), load_file(other) if other.exists() else {}
        meta_a = json.loads(path.with_suffix(".json").read_text())
        meta_b = json.loads(other.with_suffix(".json").read_text()) if other.exists() else {}
        equal = bool(expected) and expected.keys() == actual.keys()
        equal = equal and all(torch.equal(expected[name], actual[name]) for name in expected)
        difference = max(
            (
                float((expected[name].double() - actual[name].double()).abs().max())
                for name in expected
                if name in actual
            ),
            default=float("nan"),
        )
        rows.append(
            {
                "entry": path.stem,
                "tensors": sorted(expected),
                "bit_identical": equal,
                "max_abs_difference": difference,
                "count": meta_a.get("count"),
                "count_resumed": meta_b.get("count"),
            }
        )
    return rows


def main(argv=None) -> dict:
    options = parse_args(argv)
    common.setup()
    work = Path(tempfile.mkdtemp(prefix="memit-resume-"))
    plain_dir, resumed_dir = work / "uninterrupted", work / "resumed"
    plain_dir.mkdir()
    resumed_dir.mkdir()
    plain_seconds = run_to_end(stats_command(options, plain_dir, None), options.timeout)
    command = stats_command(options, resumed_dir, options.checkpoint_every)
    killed_after, checkpoints = run_until_checkpoint(command, resumed_dir, options.timeout)
    resumed_seconds = run_to_end(command, options.timeout)
    rows = compare(plain_dir, resumed_dir)
    leftovers = sorted(p.name for p in resumed_dir.glob("*.ckpt"))
    print(
        f"{options.stats_tokens} tokens: uninterrupted {plain_seconds:.1f} s; killed after {killed_after:.1f} s "
        f"(checkpoint {', '.join(checkpoints)}); resumed run {resumed_seconds:.1f} s; checkpoints left: {leftovers}"
    )
    print("| entry | bit-identical | max abs difference | tokens (uninterrupted / resumed) |")
    print("|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['entry']} | {row['bit_identical']} | {row['max_abs_difference']:.3g} | "
            f"{row['count']} / {row['count_resumed']} |"
        )
    results = {
        "benchmark": "statistics_resume",
        "machine": common.machine("cpu"),
        "stats_tokens": options.stats_tokens,
        "checkpoint_every": options.checkpoint_every,
        "uninterrupted_seconds": plain_seconds,
        "killed_after_seconds": killed_after,
        "resumed_run_seconds": resumed_seconds,
        "checkpoints_left": leftovers,
        "entries": rows,
        "all_bit_identical": bool(rows) and all(row["bit_identical"] for row in rows),
    }
    common.write_json(options.output, results)
    return results


if __name__ == "__main__":
    main()
