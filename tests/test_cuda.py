"""The editor on a CUDA device (skipped without one): edits succeed, tensors stay on the model's device, bfloat16
models are edited in their dtype, restore is bit-exact and the adapter reproduces the edit.

Run on a GPU machine with `pytest tests/test_cuda.py`; CI has no GPU, so these tests are skipped there.
"""

import copy

import pytest
import torch
from peft import PeftModel

from memit_hf.editor import Editor
from tests.testing_utils import (
    build_tiny_causal_lm,
    build_tiny_tokenizer,
    changed_tensors,
    parameters_snapshot,
    subject_final_requests,
    tiny_corpus,
    tiny_editing_arguments,
)


pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def argmax_after(model, tokenizer, prompts):
    batch = [torch.tensor([tokenizer(p)["input_ids"]], device=model.device) for p in prompts]
    with torch.no_grad():
        return [int(model(input_ids=ids).logits[0, -1].argmax()) for ids in batch]


def first_targets(tokenizer, requests):
    return [tokenizer(" " + r["target_new"], add_special_tokens=False)["input_ids"][0] for r in requests]


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma3_text"])
def test_edit_on_cuda(model_type, tokenizer, tmp_path):
    base = build_tiny_causal_lm(model_type, vocab_size=len(tokenizer)).cuda()
    model = copy.deepcopy(base)
    before = parameters_snapshot(model)
    editor = Editor(
        model, args=tiny_editing_arguments(tmp_path / "stats"), processing_class=tokenizer, stats_dataset=tiny_corpus()
    )
    requests = subject_final_requests()
    output = editor.edit(requests)
    prompts = [r["prompt"].format(r["subject"]) for r in requests]
    assert argmax_after(model, tokenizer, prompts) == first_targets(tokenizer, requests)
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert output.metrics["residual_achieved"] > 0.2
    editor.save_adapter(tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").cuda()
    ids = torch.tensor([tokenizer(prompts[0])["input_ids"]], device="cuda")
    with torch.no_grad():
        assert (peft_model(input_ids=ids).logits - model(input_ids=ids).logits).abs().max() <= 1e-4
    editor.restore()
    assert changed_tensors(model, before) == []


def test_bfloat16_model_is_edited_in_its_dtype(tokenizer, tmp_path):
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer)).to("cuda", torch.bfloat16)
    before = parameters_snapshot(model)
    editor = Editor(
        model, args=tiny_editing_arguments(tmp_path / "stats"), processing_class=tokenizer, stats_dataset=tiny_corpus()
    )
    requests = subject_final_requests()
    output = editor.edit(requests)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert changed_tensors(model, before) == [f"{d.module_name}.weight" for d in output.deltas]
    prompts = [r["prompt"].format(r["subject"]) for r in requests]
    hits = sum(a == b for a, b in zip(argmax_after(model, tokenizer, prompts), first_targets(tokenizer, requests)))
    assert hits >= 3  # bfloat16 rounding of the edited weights may cost a marginal edit
    editor.restore()
    assert changed_tensors(model, before) == []
