"""Teacher-forced against generative figures on SmolLM2-135M-Instruct: does the edited model *say* the new object?

The first n CounterFact records are evaluated on the unedited model (`counterfact` and `generative` families), then
edited in one batch and evaluated again; the generative neighborhood stability of the edited model is measured
against the unedited model's greedy continuations (`Editor.evaluate` passes `Editor.unedited`). With
`--mquake-cases m`, the first m MQuAKE cases are then evaluated with the `multihop` family before and after editing
all of their single-hop facts in one batch (the CounterFact edit restored first). It prints the side-by-side table
of `memit-hf evaluate` and the full table, and writes JSON with the metrics, timings and example continuations.

`--variant NAME FIELD=VALUE ...` (repeatable) edits the same records once per variant of the editing arguments (the
unedited model is evaluated once) and adds a table with one row per variant: how settings meant to make the edit
carry over to generation and chat (more or other context templates, chat-formatted templates, ...) compare with the
defaults, teacher-forced figures included.

    python benchmarks/generative_counterfact.py --num-records 100 --stats-cache-dir /tmp/bench_stats \\
        --output benchmarks/results/generative_counterfact.json
    python benchmarks/generative_counterfact.py --variant default --variant chat context_template_chat=true \\
        --variant templates10 num_context_templates=10 --output benchmarks/results/generative_variants.json
"""

import argparse
import time

import common


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(common.SHARED / "counterfact.jsonl"), help="CounterFact records.")
    parser.add_argument("--num-records", type=int, default=100, help="Evaluate (and edit) the first n records.")
    parser.add_argument(
        "--model", default=None, help="A `.gguf` file, folder or Hub id (default: the embedded SmolLM2-135M-Instruct)."
    )
    parser.add_argument("--no-edit", action="store_true", help="Evaluate the unedited model only.")
    common.add_statistics_options(parser)
    parser.add_argument("--mquake", default=str(common.SHARED / "mquake_cf_akew.jsonl"), help="MQuAKE records.")
    parser.add_argument("--mquake-cases", type=int, default=0, help="Also run the multi-hop test on m cases.")
    parser.add_argument("--examples", type=int, default=5, help="Save the continuations of this many records.")
    parser.add_argument("--batch-size", type=int, default=64, help="Sequences per forward pass / generate call.")
    parser.add_argument(
        "--metrics",
        nargs="+",
        default=["counterfact", "generative", "wild"],
        help="Metric families (`zsre` instead of `counterfact` for zsRE records; `wild` needs questions).",
    )
    parser.add_argument(
        "--perplexity-corpus",
        nargs="+",
        default=common.HELD_OUT,
        help="Held-out perplexity corpus files (not used for the statistics); `none` to skip the perplexity.",
    )
    parser.add_argument("--perplexity-tokens", type=int, default=20_000, help="Token budget of the perplexity.")
    common.add_variant_option(
        parser, "A named variant of the editing arguments (repeatable; default: one variant, the defaults)."
    )
    parser.add_argument("--device", default=None, help="`cuda` or `cpu` (default: cuda when available).")
    parser.add_argument("--seed", type=int, default=42, help="The editing seed (the library default).")
    parser.add_argument(
        "--output", default=str(common.REPO / "benchmarks" / "results" / "generative_counterfact.json")
    )
    return parser.parse_args(argv)


def examples(model, tokenizer, requests) -> list[dict]:
    """The greedy and chat continuations of the rewrite, paraphrase and neighborhood prompts of `requests`."""
    from memit_hf.evaluation import greedy_continuations

    prompts = [p for r in requests for p in [r.text, *r.paraphrase_prompts, *r.neighborhood_prompts]]
    plain = greedy_continuations(model, tokenizer, prompts)
    chat = greedy_continuations(model, tokenizer, prompts, chat=True, max_new_tokens=32)
    return [{"prompt": p, "greedy": g, "chat": c} for p, g, c in zip(prompts, plain, chat)]


VARIANT_COLUMNS = {
    "ES": "efficacy_success",
    "PS": "paraphrase_success",
    "NS": "neighborhood_success",
    "gen ES (prefix)": "gen_efficacy_prefix",
    "gen PS (prefix)": "gen_paraphrase_prefix",
    "gen PS (contains)": "gen_paraphrase_contains",
    "gen NS first word": "gen_neighborhood_first_word",
    "gen NS leading word": "gen_neighborhood_leading_word",
    "gen bleed": "gen_neighborhood_bleed",
    "chat ES": "chat_efficacy_contains",
    "chat PS": "chat_paraphrase_contains",
    "chat bleed": "chat_neighborhood_bleed",
    "wild ES (contains)": "wild_efficacy_contains",
    "wild PS (contains)": "wild_paraphrase_contains",
    "wild ES (exact)": "wild_efficacy_exact",
    "wild NS unchanged": "wild_neighborhood_unchanged",
    "wild bleed": "wild_neighborhood_bleed",
    "perplexity": "perplexity",
}
"""The columns of the variants table: teacher-forced, greedy, chat and wild figures, and the held-out perplexity."""


def variant_row(name: str, metrics: dict) -> str:
    """One Markdown row of the variants table."""
    return f"| {name} | " + " | ".join(common.fmt(metrics.get(key)) for key in VARIANT_COLUMNS.values()) + " |"


def variants_table(by_variant: dict[str, dict], pre: dict) -> str:
    """One row per variant (and the unedited model), the columns of `VARIANT_COLUMNS`."""
    lines = ["| variant | " + " | ".join(VARIANT_COLUMNS) + " |", "| --- " * (len(VARIANT_COLUMNS) + 1) + "|"]
    lines.append(variant_row("unedited", pre))
    lines.extend(variant_row(name, entry["metrics"]) for name, entry in by_variant.items())
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    options = parse_args(argv)
    common.setup()
    from memit_hf import EditingArguments, Editor, load_requests
    from memit_hf.cli.evaluate import comparison_table, markdown_table
    from memit_hf.evaluation import evaluate_model
    from memit_hf.requests import changes_nothing

    device = options.device or common.default_device()
    model, tokenizer = common.load_model(device, options.model)
    # Records whose edit would change nothing (zsRE's 90th: its alternative answer is its answer) cannot be edited:
    # the first n editable records are used, and the skipped ones are reported.
    records = load_requests(options.data)
    editable = [request for request in records if not changes_nothing(request)]
    requests = editable[: options.num_records]
    skipped = [
        request.record_index for request in records[: requests[-1].record_index + 1] if changes_nothing(request)
    ]
    corpus = common.corpus_option(options.corpus)
    base = {**common.statistics_arguments(options), "seed": options.seed}
    variants = {name: common.parse_settings(settings) for name, *settings in options.variant or [["default"]]}
    editor = Editor(model, args=EditingArguments.from_flat(base), processing_class=tokenizer, stats_dataset=corpus)
    metrics = list(options.metrics)
    held_out = None if options.perplexity_corpus == ["none"] else common.corpus_option(options.perplexity_corpus)
    perplexity = dict(perplexity_texts=held_out, perplexity_num_tokens=options.perplexity_tokens)
    timings: dict[str, float] = {}
    shown = requests[: options.examples]

    tick = time.perf_counter()
    pre = evaluate_model(model, tokenizer, requests, metrics=metrics, batch_size=options.batch_size, **perplexity)
    timings["evaluate_unedited_s"] = time.perf_counter() - tick
    result = dict(pre) if options.no_edit else {f"pre_{key}": value for key, value in pre.items()}
    before = examples(model, tokenizer, shown)
    after = None
    edit_metrics = None
    by_variant: dict[str, dict] = {}
    for name, settings in ({} if options.no_edit else variants).items():
        editor = Editor(
            model,
            args=EditingArguments.from_flat({**base, **settings}),
            processing_class=tokenizer,
            stats_dataset=corpus,
        )
        tick = time.perf_counter()
        variant_edit = editor.edit(requests).metrics
        edit_seconds = time.perf_counter() - tick
        tick = time.perf_counter()
        post = editor.evaluate(
            requests, metrics=metrics, batch_size=options.batch_size, include_pre=False, **perplexity
        )
        evaluate_seconds = time.perf_counter() - tick
        by_variant[name] = {
            "settings": settings,
            "metrics": post,
            "edit_metrics": variant_edit,
            "timings": {"edit_s": edit_seconds, "evaluate_edited_s": evaluate_seconds},
        }
        print(f"variant {name} {settings}: " + variant_row(name, post))
        if after is None:  # the first variant is the one reported in full
            result = {**post, **result}
            after = examples(model, tokenizer, shown)
            edit_metrics = variant_edit
            timings.update(by_variant[name]["timings"])
        editor.restore()

    multihop = None
    if options.mquake_cases:
        first = next(iter(variants.values()))  # the multi-hop edit uses the first variant's settings
        editor = Editor(
            model, args=EditingArguments.from_flat({**base, **first}), processing_class=tokenizer, stats_dataset=corpus
        )
        mquake = load_requests(options.mquake)
        case_ids = list(dict.fromkeys(r.case_id for r in mquake))[: options.mquake_cases]
        cases = [r for r in mquake if r.case_id in set(case_ids)]
        tick = time.perf_counter()
        multihop_pre = evaluate_model(model, tokenizer, cases, metrics=["multihop"], batch_size=options.batch_size)
        timings["multihop_unedited_s"] = time.perf_counter() - tick
        multihop = dict(multihop_pre) if options.no_edit else {f"pre_{k}": v for k, v in multihop_pre.items()}
        if not options.no_edit:
            tick = time.perf_counter()
            editor.edit(cases)
            timings["multihop_edit_s"] = time.perf_counter() - tick
            tick = time.perf_counter()
            multihop_post = editor.evaluate(
                cases, metrics=["multihop"], batch_size=options.batch_size, include_pre=False
            )
            timings["multihop_edited_s"] = time.perf_counter() - tick
            multihop.update(multihop_post)
            editor.restore()
        result.update(multihop)
        multihop = {"num_cases": len(case_ids), "num_edits": len(cases), "metrics": multihop}

    table = comparison_table(result) + "\n" + markdown_table(result)
    if len(by_variant) > 1:
        table += "\n" + variants_table(by_variant, pre)
    print(f"{len(requests)} records from {options.data}" + (" (unedited only)" if options.no_edit else ""))
    if skipped:
        print(f"Skipped records whose edit would change nothing: {skipped}")
    print(table)
    common.write_json(
        options.output,
        {
            "data": options.data,
            "num_records": len(requests),
            "skipped_records": skipped,
            "edited": not options.no_edit,
            "machine": common.machine(device),
            "args": editor.resolved_args.to_dict(),
            "stats_corpus": corpus,
            "metrics": result,
            "multihop": multihop,
            "timings": timings,
            "edit_metrics": edit_metrics,
            "variants": by_variant,
            "examples": {"unedited": before, "edited": after},
            "table": table,
        },
    )
    print(f"wrote {options.output}")
    return result


if __name__ == "__main__":
    main()
