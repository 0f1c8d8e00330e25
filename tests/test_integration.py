"""MEMIT on the real SmolLM2-135M-Instruct: 20 CounterFact-style edits of facts the model knows.

The requests (`tests/data/smollm2_counterfact.jsonl`) were chosen so that the unedited model prefers `target_true`
over the counterfactual `target_new` on every rewrite and neighborhood prompt. Statistics come from the small corpus
shipped beside them (`tests/data/stats_corpus.txt`, about 12k SmolLM2 tokens, all of them used), cached in a
temporary directory so the test never reads or writes the user's cache.

One module-scoped fixture loads the model once and runs evaluate -> edit -> evaluate -> restore -> evaluate; the
tests below check its results.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from memit_hf.architectures import get_layout
from memit_hf.arguments import EditingArguments
from memit_hf.editor import Editor
from memit_hf.models import load_default_model
from memit_hf.requests import load_requests
from memit_hf.values import BlockRunner, ZChunk, prefix_cache_error, prefix_cache_matches, prefix_cache_tolerance


pytestmark = pytest.mark.integration

DATA = Path(__file__).parent / "data"
REQUESTS_FILE = DATA / "smollm2_counterfact.jsonl"
CORPUS_FILE = DATA / "stats_corpus.txt"

MIN_EFFICACY = 95.0
MIN_PARAPHRASE = 60.0
MAX_NEIGHBORHOOD_DROP = 10.0


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits.float()


def _rounded(metrics: dict[str, float]) -> dict[str, float]:
    return {key: round(value, 2) for key, value in metrics.items()}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    model, tokenizer = load_default_model()
    requests = load_requests(REQUESTS_FILE)
    args = EditingArguments(
        stats_num_tokens=20_000,
        stats_cache_dir=str(tmp_path_factory.mktemp("stats")),
        # Two sampled context prefixes (plus the bare prompt) instead of five: the z optimisation, which dominates
        # the runtime on CPU, costs about half as much, and the thresholds below still hold.
        num_context_templates=2,
        seed=0,
    )
    editor = Editor(model, args=args, processing_class=tokenizer, stats_dataset=[CORPUS_FILE])
    layers = editor.resolved_args.layers
    names = [editor.layout.edit_name(layer) for layer in layers]
    original = {name: model.get_submodule(name).weight.detach().clone() for name in names}

    probes = tokenizer([r.text for r in requests[:8]], return_tensors="pt", padding=True)
    pre = editor.evaluate(requests)
    unedited_logits = _logits(model, probes)
    output = editor.edit(requests)
    post = editor.evaluate(requests, include_pre=False)
    edited_logits = _logits(model, probes)
    adapter_dir = tmp_path_factory.mktemp("adapter")
    report = editor.save_adapter(adapter_dir)
    editor.restore()
    restored_weights = {name: model.get_submodule(name).weight.detach().clone() for name in names}
    restored = editor.evaluate(requests)

    peft_model = PeftModel.from_pretrained(model, adapter_dir)  # the plain peft path, on the restored model
    adapter_logits = _logits(peft_model, probes)
    with peft_model.disable_adapter():
        disabled_logits = _logits(peft_model, probes)
    merged_logits = _logits(peft_model.merge_and_unload(), probes)
    return {
        "adapter": {
            "report": report,
            "config": json.loads((adapter_dir / "adapter_config.json").read_text()),
            "unedited": unedited_logits,
            "edited": edited_logits,
            "adapter": adapter_logits,
            "disabled": disabled_logits,
            "merged": merged_logits,
        },
        "requests": requests,
        "layers": layers,
        "output": output,
        "pre": pre,
        "post": post,
        "restored": restored,
        "original_weights": original,
        "restored_weights": restored_weights,
    }


def test_requests_are_facts_the_unedited_model_knows(run):
    pre = run["pre"]
    assert len(run["requests"]) == 20
    # target_true beats the counterfactual target_new on (nearly) every rewrite and neighborhood prompt
    assert pre["efficacy_success"] <= 10.0, _rounded(pre)
    assert pre["neighborhood_success"] >= 90.0, _rounded(pre)


def test_edit_output(run):
    output = run["output"]
    layers = run["layers"]
    assert layers == [3, 4, 5, 6, 7]  # default_layers for SmolLM2's 30 layers
    assert [delta.module_name for delta in output.deltas] == [f"model.layers.{i}.mlp.down_proj" for i in layers]
    for delta in output.deltas:
        assert delta.lora_B.shape == (576, 20) and delta.lora_A.shape == (20, 1536)
        assert torch.isfinite(delta.lora_B).all() and torch.isfinite(delta.lora_A).all()
    metrics = output.metrics
    assert metrics["num_requests"] == 20
    assert all(math.isfinite(value) for value in metrics.values()), metrics
    assert metrics["z_final_loss"] < metrics["z_initial_loss"]


def test_efficacy(run):
    post = run["post"]
    assert post["efficacy_success"] >= MIN_EFFICACY, _rounded(post)


def test_paraphrase(run):
    post = run["post"]
    assert post["paraphrase_success"] >= MIN_PARAPHRASE, _rounded(post)


def test_neighborhood_drop(run):
    pre, post = run["pre"], run["post"]
    drop = pre["neighborhood_success"] - post["neighborhood_success"]
    assert drop <= MAX_NEIGHBORHOOD_DROP, (_rounded(pre), _rounded(post))


def test_restore_brings_back_the_unedited_model_exactly(run):
    for name, weight in run["original_weights"].items():
        assert torch.equal(run["restored_weights"][name], weight), name
    assert run["restored"] == run["pre"]


def test_adapter_reproduces_the_edit_with_plain_peft(run):
    """The saved adapter, loaded with `PeftModel.from_pretrained` on the unedited SmolLM2, gives the in-place edited
    model's logits (float32 rounding apart); disabled it gives the unedited logits and merged the edited ones, bit for
    bit."""
    adapter = run["adapter"]
    # Un-merged, peft computes W x + B (A x) while the in-place edit rounds W + B A to float32 once: on logits up to
    # ~36 the two differ by about 7e-5 (2e-6 relative). Merged, peft forms W + B A exactly as the edit did.
    assert (adapter["adapter"] - adapter["edited"]).abs().max() <= 2e-4
    assert torch.equal(adapter["merged"], adapter["edited"])
    assert torch.equal(adapter["disabled"], adapter["unedited"])
    assert (adapter["edited"] - adapter["unedited"]).abs().max() > 1.0
    config, report = adapter["config"], adapter["report"]
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert config["r"] == config["lora_alpha"] == 20 and len(config["target_modules"]) == 5
    assert report.max_reconstruction_error == 0.0
    assert report.adapter_bytes < report.dense_bytes / 10  # 20 * (576 + 1536) vs 576 * 1536 numbers per layer


def test_bfloat16_keeps_the_prefix_cache_shortcut():
    """In bfloat16 the cached and plain forwards of SmolLM2 differ by bfloat16 rounding (well above float32's
    tolerance, which made every bfloat16 edit fall back to the slow plain forward), within the bfloat16 tolerance."""
    model, tokenizer = load_default_model(torch.bfloat16)
    requests = load_requests(REQUESTS_FILE)[:4]
    templates = ["{}", "The weather is nice today. {}", "In 1990, the city {}"]
    chunk = ZChunk.build(BlockRunner(model, get_layout(model), 7), tokenizer, requests, templates, use_cache=True)
    error = prefix_cache_error(chunk)
    assert prefix_cache_tolerance(torch.float32) < error <= prefix_cache_tolerance(torch.bfloat16)
    assert prefix_cache_matches(chunk)
