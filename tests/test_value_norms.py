"""Norm-Anchor Scaling (`memit_hf.value_norms`, `EditingArguments.v_norm_anchor`): rescaled value vectors, the skip
rule, the anchor of the original model, and that it is off by default."""

import pytest
import torch

from memit_hf.editor import Editor
from memit_hf.requests import load_requests
from memit_hf.value_norms import anchor_value_norms, mean_value_norm, projection_outputs, value_vectors
from tests.testing_utils import (
    build_tiny_causal_lm,
    build_tiny_tokenizer,
    next_token_argmax,
    subject_final_requests,
    tiny_corpus,
    tiny_editing_arguments,
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def random_values(n: int = 6, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float32 targets and block outputs with deltas of growing size, and float64 projection outputs."""
    generator = torch.Generator().manual_seed(seed)
    initial = torch.randn(n, d, generator=generator)
    delta = torch.randn(n, d, generator=generator) * torch.linspace(0.1, 3.0, n)[:, None]
    return initial + delta, initial, torch.randn(n, d, generator=generator, dtype=torch.float64)


def test_anchored_value_vectors_have_the_anchor_norm_and_outliers_keep_their_value():
    targets, initial, v0 = random_values()
    norms = value_vectors(targets, initial, v0).norm(dim=1)
    anchor = float(norms.median())
    anchored, ratio = anchor_value_norms(targets, initial, v0, anchor, skip=1.5)
    assert torch.allclose(ratio.double(), norms / anchor, rtol=1e-6)
    skipped = norms > 1.5 * anchor
    assert 0 < int(skipped.sum()) < len(norms)  # both kinds of request are present
    # A skipped request's target is its current block output, bit for bit (v* = v0).
    assert torch.equal(anchored[skipped], initial[skipped])
    # Every other one: z = h - v0 + v*, with ||v*|| = anchor (float32 targets: to float32 rounding).
    kept = value_vectors(anchored, initial, v0)[~skipped]
    assert torch.allclose(
        kept.norm(dim=1), torch.full((int((~skipped).sum()),), anchor, dtype=torch.float64), rtol=1e-5
    )
    # ... in the direction of the solved v*.
    cosine = torch.nn.functional.cosine_similarity(kept, value_vectors(targets, initial, v0)[~skipped])
    assert float(cosine.min()) > 1 - 1e-6
    everyone, _ = anchor_value_norms(targets, initial, v0, anchor, skip=None)
    assert torch.allclose(value_vectors(everyone, initial, v0).norm(dim=1), torch.full_like(norms, anchor), rtol=1e-5)


def test_the_anchor_is_the_mean_norm_without_the_top_quantile():
    targets, initial, v0 = random_values(n=20)
    norms = value_vectors(targets, initial, v0).norm(dim=1)
    kept = norms[norms <= torch.quantile(norms, 0.9)]
    assert len(kept) == 18
    assert mean_value_norm(targets, initial, v0, upper_quantile=0.9) == pytest.approx(float(kept.mean()), rel=1e-12)
    assert mean_value_norm(targets, initial, v0, upper_quantile=1.0) == pytest.approx(float(norms.mean()), rel=1e-12)
    with pytest.raises(ValueError, match="upper_quantile"):
        mean_value_norm(targets, initial, v0, upper_quantile=0.0)


def test_value_norm_anchoring_on_a_tiny_model(tokenizer, tmp_path):
    """Off by default (no metric); `value_norm_anchor` is the original model's mean, also after edits; with
    `v_norm_anchor` set, the edit's value vectors have that norm and the edit still lands."""
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    requests = subject_final_requests()
    editor = Editor(
        model, args=tiny_editing_arguments(tmp_path), processing_class=tokenizer, stats_dataset=tiny_corpus()
    )
    raw = editor.compute_values(requests)
    assert raw.value_norm_ratio is None
    z_layer = editor.resolved_args.layers[-1]
    v0 = projection_outputs(model, tokenizer, editor.layout, load_requests(requests), z_layer)
    anchor = editor.value_norm_anchor(requests)
    expected = mean_value_norm(raw.targets, raw.initial, v0)
    assert anchor == pytest.approx(expected, rel=1e-6)
    assert editor.value_norm_anchor(requests, values=raw) == expected
    output = editor.edit(requests[:2])
    assert "value_norm_ratio" not in output.metrics
    assert editor.value_norm_anchor(requests, values=raw) == expected  # the original model's v0
    assert editor.value_norm_anchor(requests) == pytest.approx(anchor, rel=1e-6)  # the edit switched off
    editor.restore()

    editor.args = tiny_editing_arguments(tmp_path, v_norm_anchor=anchor, v_norm_anchor_skip=None)
    values = editor.compute_values(requests)
    assert torch.allclose(
        value_vectors(values.targets, values.initial, v0).norm(dim=1),
        torch.full((len(requests),), anchor, dtype=torch.float64),
        rtol=1e-5,
    )
    assert torch.equal(editor.compute_values(requests).targets, values.targets)  # deterministic
    from_raw = editor.edit(requests, values=raw)  # raw values get the editor's anchor, as its own z would
    assert torch.equal(from_raw.values.targets, values.targets)
    editor.restore()
    output = editor.edit(requests, values=values)
    assert output.metrics["value_norm_skipped"] == 0.0
    assert all(
        torch.equal(a.lora_B, b.lora_B) and torch.equal(a.lora_A, b.lora_A)
        for a, b in zip(from_raw.deltas, output.deltas, strict=True)
    )
    assert output.metrics["value_norm_ratio"] == pytest.approx(float(values.value_norm_ratio.mean()))
    prompts = [r["prompt"].replace("{}", r["subject"]) for r in requests]
    targets = [tokenizer(" " + r["target_new"], add_special_tokens=False)["input_ids"][0] for r in requests]
    assert next_token_argmax(model, tokenizer, prompts) == targets


def test_value_norm_anchoring_refuses_a_normalised_projection_output(tokenizer, tmp_path):
    model = build_tiny_causal_lm("gemma3_text", vocab_size=len(tokenizer))
    editor = Editor(
        model,
        args=tiny_editing_arguments(tmp_path, v_norm_anchor=1.0),
        processing_class=tokenizer,
        stats_dataset=tiny_corpus(),
    )
    with pytest.raises(ValueError, match="`v_norm_anchor` \\(NAS\\) needs the edited projection's output"):
        editor.compute_values(subject_final_requests())


def test_edit_metrics_count_the_requests_nas_left_unchanged():
    """`value_norm_skipped` counts exactly the requests above the skip multiple, `value_norm_ratio` is their mean
    ratio; without NAS neither metric exists."""
    from dataclasses import replace

    from memit_hf.updates import value_norm_metrics
    from memit_hf.values import ValueResult

    targets, initial, v0 = random_values()
    zeros = torch.zeros(len(targets))
    raw = ValueResult(targets, initial, zeros, zeros, zeros, zeros.long())
    assert value_norm_metrics(raw) == {}
    norms = value_vectors(targets, initial, v0).norm(dim=1)
    anchor = float(norms.median())
    anchored, ratio = anchor_value_norms(targets, initial, v0, anchor, skip=1.5)
    metrics = value_norm_metrics(replace(raw, targets=anchored, value_norm_ratio=ratio))
    assert metrics["value_norm_skipped"] == float((norms > 1.5 * anchor).sum()) > 0
    assert metrics["value_norm_ratio"] == pytest.approx(float((norms / anchor).mean()), rel=1e-6)
