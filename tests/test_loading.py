"""Tests of `memit_hf.loading`: `load_edits` (peft model, merged model, model-type check) and `combine_edits` (two edit
adapters side by side, switchable, and their exact sum with peft's "cat" combination)."""

import copy

import pytest
import torch
from peft import PeftModel

from memit_hf import combine_edits, load_edits
from memit_hf.editor import Editor
from tests.testing_utils import (
    build_tiny_causal_lm,
    build_tiny_tokenizer,
    subject_final_requests,
    tiny_corpus,
    tiny_editing_arguments,
)


ATOL = 1e-5


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def logits(model, tokenizer):
    batch = tokenizer(
        ["The city of the Eiffel Tower", "Therefore Lionel Messi", "The capital of France"],
        return_tensors="pt",
        padding=True,
    )
    with torch.no_grad():
        return model(**batch).logits


class TwoBatches:
    """Two separate edit batches of the same base model, each saved as its own adapter: A edits requests 0-1 of the
    base, B edits requests 2-3 of the base (independently), and `both` is the base with A then B applied in place."""

    def __init__(self, model_type, tokenizer, directory):
        self.base = build_tiny_causal_lm(model_type, vocab_size=len(tokenizer))
        requests = subject_final_requests()
        self.models, self.outputs = {}, {}
        for name, part in (("a", requests[:2]), ("b", requests[2:])):
            model = copy.deepcopy(self.base)
            editor = Editor(
                model,
                args=tiny_editing_arguments(directory / "stats"),
                processing_class=tokenizer,
                stats_dataset=tiny_corpus(),
            )
            self.outputs[name] = editor.edit(part)
            editor.save_adapter(directory / name)
            self.models[name] = model
        self.directory = directory


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def two(request, tokenizer, tmp_path_factory):
    return TwoBatches(request.param, tokenizer, tmp_path_factory.mktemp(f"loading-{request.param}"))


def test_load_edits_returns_peft_model(two, tokenizer):
    model = load_edits(copy.deepcopy(two.base), two.directory / "a")
    assert isinstance(model, PeftModel) and model.active_adapters == ["default"]
    assert (logits(model, tokenizer) - logits(two.models["a"], tokenizer)).abs().max() <= ATOL
    with model.disable_adapter():
        assert torch.equal(logits(model, tokenizer), logits(two.base, tokenizer))


def test_load_edits_merged(two, tokenizer):
    merged = load_edits(copy.deepcopy(two.base), two.directory / "b", merge=True)
    assert type(merged) is type(two.base)
    assert (logits(merged, tokenizer) - logits(two.models["b"], tokenizer)).abs().max() <= ATOL


def test_two_adapters_switch_and_combine_exactly(two, tokenizer):
    model = load_edits(copy.deepcopy(two.base), two.directory / "a", adapter_name="a")
    model = load_edits(model, two.directory / "b", adapter_name="b")
    assert model.active_adapters == ["a"]  # loading a second adapter does not switch to it
    model.set_adapter("b")
    assert (logits(model, tokenizer) - logits(two.models["b"], tokenizer)).abs().max() <= ATOL
    combine_edits(model, ["a", "b"], "both")
    assert model.active_adapters == ["both"]
    # the combined adapter's update is the exact sum of the two edits' updates
    for delta_a, delta_b in zip(two.outputs["a"].deltas, two.outputs["b"].deltas):
        layer = model.base_model.model.get_submodule(delta_a.module_name)
        combined = layer.get_delta_weight("both").double()
        expected = delta_a.dense().double() + delta_b.dense().double()
        assert (combined - expected).abs().max() <= 1e-6 * expected.abs().max()
        assert layer.r["both"] == delta_a.rank + delta_b.rank
    base_weights = copy.deepcopy(two.base)
    for d in two.outputs["a"].deltas + two.outputs["b"].deltas:
        base_weights.get_submodule(d.module_name).weight.data += d.dense()
    assert (logits(model, tokenizer) - logits(base_weights, tokenizer)).abs().max() <= ATOL
    with model.disable_adapter():
        assert torch.equal(logits(model, tokenizer), logits(two.base, tokenizer))


def test_combine_edits_errors(two):
    model = load_edits(copy.deepcopy(two.base), two.directory / "a", adapter_name="a")
    with pytest.raises(ValueError, match="at least two"):
        combine_edits(model, ["a"])
    with pytest.raises(ValueError, match="Unknown adapters"):
        combine_edits(model, ["a", "zzz"])


def test_load_edits_rejects_another_model_type(two, tokenizer):
    other = "gpt2" if two.base.config.model_type == "llama" else "llama"
    with pytest.raises(ValueError, match=f"made for a `{two.base.config.model_type}` model"):
        load_edits(build_tiny_causal_lm(other, vocab_size=len(tokenizer)), two.directory / "a")
