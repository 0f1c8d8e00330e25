"""Sweep MEMIT hyperparameters on SmolLM2-135M-Instruct with the shared CounterFact records.

Target values z depend on the edited layers and the z settings but not on lambda, so each (layers, z settings) point
optimises z once and every lambda reuses it. Prints a table and writes JSON.

    python benchmarks/sweep_hparams.py --num-edits 100 --stats-cache-dir ~/.cache/memit-stats
"""

import argparse
import itertools
import json
import os
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(SHARED / "counterfact.jsonl"))
    parser.add_argument(
        "--corpus",
        nargs="+",
        default=[
            str(SHARED / "corpus" / "wikitext-2-raw.valid.txt"),
            str(SHARED / "corpus" / "wikitext-2-raw.test.txt"),
        ],
    )
    parser.add_argument("--num-edits", type=int, default=100)
    parser.add_argument("--stats-tokens", type=int, default=408_567)
    parser.add_argument("--stats-cache-dir", default=None)
    parser.add_argument("--layer-sets", nargs="+", default=["3-7", "2-6", "4-8"], help="Inclusive ranges, e.g. 3-7.")
    parser.add_argument("--lambdas", type=float, nargs="+", default=[500, 1500, 5000, 15000])
    parser.add_argument("--clamps", type=float, nargs="+", default=[0.75])
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "sweep_hparams.json"))
    return parser.parse_args(argv)


def main(argv=None):
    options = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    from memit_hf import EditingArguments, Editor, load_requests
    from memit_hf.models import load_default_model

    requests = load_requests(options.data)[: options.num_edits]
    model, tokenizer = load_default_model()
    rows = []
    baseline = None
    for layer_set, clamp in itertools.product(options.layer_sets, options.clamps):
        first, last = (int(x) for x in layer_set.split("-"))
        cached_values = None
        for lam in options.lambdas:
            args = EditingArguments(
                layers=list(range(first, last + 1)),
                algorithm_config={"mom2_update_weight": lam},
                clamp_norm_factor=clamp,
                stats_num_tokens=options.stats_tokens,
                stats_cache_dir=options.stats_cache_dir,
            )
            editor = Editor(model, args=args, processing_class=tokenizer, stats_dataset=options.corpus)
            tick = time.perf_counter()
            output = editor.edit(requests, values=cached_values)  # z depends on layers and clamp, not on lambda
            cached_values = output.values
            metrics = editor.evaluate(requests, include_pre=baseline is None)
            if baseline is None:
                baseline = {k[4:]: v for k, v in metrics.items() if k.startswith("pre_")}
            editor.restore()
            row = {
                "layers": layer_set,
                "clamp_norm_factor": clamp,
                "mom2_update_weight": lam,
                "seconds": time.perf_counter() - tick,
                "residual_achieved": output.metrics["residual_achieved"],
                "z_final_loss": output.metrics["z_final_loss"],
                **{k: v for k, v in metrics.items() if not k.startswith("pre_")},
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"num_edits": options.num_edits, "unedited": baseline, "runs": rows}
    Path(options.output).parent.mkdir(parents=True, exist_ok=True)
    Path(options.output).write_text(json.dumps(result, indent=2))
    print(
        f"\nUnedited: ES {baseline['efficacy_success']:.1f} PS {baseline['paraphrase_success']:.1f} "
        f"NS {baseline['neighborhood_success']:.1f} Score {baseline['score']:.1f}"
    )
    print("| layers | clamp | lambda | ES | PS | NS | Score | residual achieved |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['layers']} | {r['clamp_norm_factor']} | {r['mom2_update_weight']:g} | {r['efficacy_success']:.1f} "
            f"| {r['paraphrase_success']:.1f} | {r['neighborhood_success']:.1f} | {r['score']:.1f} "
            f"| {r['residual_achieved']:.3f} |"
        )


if __name__ == "__main__":
    main()
