"""End-to-end tests of `memit_hf.editor.Editor` on every tiny architecture: edit success, locality of the change in
parameter space, MEMIT's defining equation per layer, atomicity, validation, determinism, composition and restore."""

import copy

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from memit_hf.algorithms import MEMIT, IllConditionedError, LayerProblem, MEMITConfig
from memit_hf.deltas import LayerDelta, add_delta
from memit_hf.editor import Editor, EditorCallback, EditOutput
from memit_hf.keys import compute_keys_and_outputs
from memit_hf.norms import rms_norm_residuals
from memit_hf.requests import load_requests
from memit_hf.statistics import StatisticsCache, push_statistics
from memit_hf.tokenization import encode_targets
from memit_hf.values import plan_chunks
from tests.testing_utils import (
    FAKE_COMMIT,
    TINY_MODEL_TYPES,
    build_tiny_causal_lm,
    build_tiny_chat_tokenizer,
    build_tiny_tokenizer,
    changed_tensors,
    fake_dataset_hub,
    next_token_argmax,
    parameters_snapshot,
    subject_final_requests,
    tiny_corpus,
    tiny_editing_arguments,
)


UNIT32 = torch.finfo(torch.float32).eps / 2
"""float32 unit roundoff 2^-24 = 6.0e-8: a float32 result of one rounded operation is within UNIT32 x its magnitude of
the exact value."""
EPS64 = torch.finfo(torch.float64).eps  # 2.2e-16


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def prompts_of(requests):
    return [r["prompt"].format(r["subject"]) for r in requests]


def first_target_ids(tokenizer, requests):
    return [ids[0] for ids in encode_targets(tokenizer, [r["target_new"] for r in requests])]


def target_log_probs(model, tokenizer, requests) -> torch.Tensor:
    """Log-probability of each request's first target token right after its prompt."""
    result = []
    with torch.no_grad():
        for prompt, target in zip(prompts_of(requests), first_target_ids(tokenizer, requests)):
            ids = torch.tensor([tokenizer(prompt)["input_ids"]])
            result.append(torch.log_softmax(model(input_ids=ids).logits[0, -1], -1)[target])
    return torch.stack(result)


def has_post_mlp_norm(layout) -> bool:
    """Whether the layout maps residuals through an RMS norm after the MLP (Gemma 2/3, OLMo 2)."""
    return getattr(layout, "post_mlp_norm_template", None) is not None


def assert_weight_moved_by(after: torch.Tensor, before: torch.Tensor, dense: torch.Tensor, roundings: torch.Tensor):
    """`after - before == dense` up to float32 rounding: the float64 difference of two float32 tensors is exact, and
    each rounded float32 sum `fl(W + Delta)` on the way from `before` to `after` is off by at most UNIT32 x |that sum|;
    `roundings` is the sum of those magnitudes (elementwise)."""
    error = (after.double() - before.double() - dense.double()).abs()
    excess = error - UNIT32 * roundings.double().abs()
    assert (excess <= 0).all(), f"max error {float(error.max()):.3e}, max excess {float(excess.max()):.3e}"


def edited_names(model_type: str) -> list[str]:
    template = {
        "gpt2": "transformer.h.{}.mlp.c_proj",
        "gptj": "transformer.h.{}.mlp.fc_out",
        "gpt_neox": "gpt_neox.layers.{}.mlp.dense_4h_to_h",
    }.get(model_type, "model.layers.{}.mlp.down_proj")
    return [template.format(layer) for layer in (0, 1)]


def make_editor(model, tokenizer, cache_dir, callbacks=None, **overrides):
    args = tiny_editing_arguments(cache_dir, **overrides)
    return Editor(model, args=args, processing_class=tokenizer, stats_dataset=tiny_corpus(), callbacks=callbacks)


class Edited:
    """One edit of a fresh tiny model, shared by the read-only tests of an architecture."""

    def __init__(self, model_type, tokenizer, cache_dir):
        self.model_type = model_type
        self.cache_dir = cache_dir
        self.model = build_tiny_causal_lm(model_type, vocab_size=len(tokenizer))
        self.before = parameters_snapshot(self.model)
        self.editor = make_editor(self.model, tokenizer, cache_dir)
        self.requests = subject_final_requests()
        self.output = self.editor.edit(self.requests)
        self.after = parameters_snapshot(self.model)


@pytest.fixture(scope="module", params=TINY_MODEL_TYPES)
def edited(request, tokenizer, tmp_path_factory):
    return Edited(request.param, tokenizer, tmp_path_factory.mktemp(f"stats-{request.param}"))


# --------------------------------------------------------------------------------------- properties of one edit
def test_every_target_becomes_the_argmax(edited, tokenizer):
    got = next_token_argmax(edited.model, tokenizer, prompts_of(edited.requests))
    assert got == first_target_ids(tokenizer, edited.requests)
    with edited.editor.unedited():
        before = next_token_argmax(edited.model, tokenizer, prompts_of(edited.requests))
    assert before != got


def test_only_edited_weights_change(edited):
    names = [name + ".weight" for name in edited_names(edited.model_type)]
    changed = sorted(name for name in edited.before if not torch.equal(edited.before[name], edited.after[name]))
    assert changed == names
    assert [d.module_name for d in edited.output.deltas] == edited_names(edited.model_type)


def test_deltas_are_the_memit_solution(edited, tokenizer):
    """Per layer, recompute K and R as MEMIT defines them on a fresh copy (keys with the earlier layers' updates
    applied, residual spread over the remaining layers and, after a post-MLP norm, mapped through it) and check that
    the stored factors are exactly the MEMIT solve of that problem, Delta (lam C + K K^T) = R K^T."""
    model = build_tiny_causal_lm(edited.model_type, vocab_size=len(tokenizer))
    editor, output = edited.editor, edited.output
    targets = output.values.targets.double()
    layers = [0, 1]
    n = len(edited.requests)
    for i, (layer, delta) in enumerate(zip(layers, output.deltas)):
        assert isinstance(delta, LayerDelta)
        assert delta.rank == n and delta.lora_B.shape[1] == delta.lora_A.shape[0] == n
        weight = delta.module_name + ".weight"
        after, before = edited.after[weight], edited.before[weight]
        # The stored factors are exactly what was added to the weight: after = fl32(before + dense), one rounding.
        assert_weight_moved_by(after, before, delta.dense(), roundings=after)
        # Rank <= n: the weight moved by B A (rank n) plus the float32 rounding of the n-term products (n UNIT32
        # |B||A|) and of the sum (UNIT32 |after|); Weyl: sigma_{n+1} <= the spectral norm of that error <= its
        # Frobenius norm. (The bound is far below the update's own n-th singular value, so the check has teeth.)
        magnitudes = delta.lora_B.double().abs() @ delta.lora_A.double().abs()
        if delta.fan_in_fan_out:
            magnitudes = magnitudes.T
        rounding = n * UNIT32 * magnitudes.norm() + UNIT32 * after.double().norm()
        singular_values = torch.linalg.svdvals(after.double() - before.double())
        assert singular_values[n] <= rounding < 1e-3 * singular_values[n - 1]
        keys, current, edit_outputs = compute_keys_and_outputs(
            model,
            tokenizer,
            editor.layout,
            output.requests,
            editor.context_templates,
            layer,
            layers[-1],
            return_edit_outputs=True,
        )
        residuals = (targets - current) / (len(layers) - i)  # what is left, spread over the remaining layers
        if has_post_mlp_norm(editor.layout):
            # The block-output residual is what the post-MLP norm's output must move by: the edited projection's
            # outputs must move by its image through the norm.
            norm = model.get_submodule(editor.layout.post_mlp_norm_name(layer))
            mapped = rms_norm_residuals(norm, residuals, edit_outputs)
            assert float((mapped - residuals).norm() / residuals.norm()) > 0.1  # the mapping is no identity here
            residuals = mapped
        # The same operations on the same weights as in the edit: the factors are the float32 roundings of this
        # float64 solve, bit for bit.
        assert torch.equal(delta.lora_B, residuals.T.float())
        statistics = editor.get_statistics([layer])[delta.module_name]
        problem = LayerProblem(delta.module_name, layer, keys, residuals, statistics)
        memit = MEMIT(MEMITConfig(mom2_update_weight=1.0))
        memit.prepare(statistics)  # as the editor does: small batches solve through the cached factor of lam C
        exact_B, exact_A = memit.solve(problem)
        assert torch.equal(delta.lora_A, exact_A.float())
        # The solve satisfies Delta S = R K^T with S = lam C + K K^T to the backward error of a float64 Cholesky
        # solve: (S + E) A^T = K^T with |E| <= (3 d + 1) EPS64 |L||L^T| and || |L||L^T| ||_2 <= d ||S||_2 (Higham,
        # Thm 10.4), so ||B A S - R K^T|| <= (3 d + 1) d EPS64 ||S||_2 ||B|| ||A||, plus the float64 rounding of the
        # products (d EPS64 times their magnitudes, far smaller).
        system = statistics.covariance() + keys.T @ keys
        rhs = residuals.T @ keys
        d = keys.shape[1]
        gamma = (3 * d + 1) * d * EPS64
        bound = gamma * (torch.linalg.matrix_norm(system, ord=2) * exact_B.norm() * exact_A.norm())
        products = (exact_B.abs() @ exact_A.abs() @ system.abs()).norm() + (residuals.T.abs() @ keys.abs()).norm()
        bound = bound + d * EPS64 * products
        assert (exact_B @ exact_A @ system - rhs).norm() <= bound
        add_delta(model, delta)
    # Replaying the deltas on a fresh copy reproduces the edited weights bit for bit.
    assert changed_tensors(model, edited.after) == []


def test_metrics(edited, tokenizer):
    metrics, values = edited.output.metrics, edited.output.values
    assert metrics["num_requests"] == 4.0 and metrics["num_layers"] == 2.0
    stages = ["templates_seconds", "statistics_seconds", "values_seconds", "update_seconds"]
    for key in stages + ["total_seconds"]:
        assert metrics[key] >= 0.0, key
    assert metrics["total_seconds"] >= sum(metrics[key] for key in stages)
    assert metrics["z_initial_loss"] == pytest.approx(float(values.initial_loss.mean()))
    assert metrics["z_final_loss"] == pytest.approx(float(values.final_loss.mean()))
    assert metrics["z_final_nll"] == pytest.approx(float(values.final_nll.mean()))
    assert metrics["z_final_loss"] < metrics["z_initial_loss"] < 7.0
    # No tiny model's loss reaches the early-stop loss (0.05): every request takes the 39 steps of the 40 iterations
    # (the last iteration takes none).
    assert (values.final_loss >= 0.05).all() and values.steps.tolist() == [39, 39, 39, 39]
    assert metrics["z_mean_steps"] == float(values.steps.float().mean()) == 39.0
    # residual_achieved = mean(1 - ||z - h_after|| / ||z - h_before||) at the last edited layer, bare prompts.
    editor = edited.editor
    _, after = compute_keys_and_outputs(edited.model, tokenizer, editor.layout, edited.output.requests, [["{}"]], 1, 1)
    with editor.unedited():
        _, before = compute_keys_and_outputs(
            edited.model, tokenizer, editor.layout, edited.output.requests, [["{}"]], 1, 1
        )
    targets = values.targets.double()
    expected = float((1 - (targets - after).norm(dim=1) / (targets - before).norm(dim=1)).mean())
    assert metrics["residual_achieved"] == pytest.approx(expected, abs=1e-5)
    assert 0.2 < metrics["residual_achieved"] <= 1.0
    assert edited.editor.history[-1] is edited.output


def test_unedited_context_is_bit_exact(edited):
    with edited.editor.unedited() as model:
        assert changed_tensors(model, edited.before) == []
    assert changed_tensors(edited.model, edited.after) == []


def test_override_layout_for_unknown_model_type(edited, tokenizer, tmp_path):
    model = build_tiny_causal_lm(edited.model_type, vocab_size=len(tokenizer))
    model.config.model_type = "mystery"
    with pytest.raises(
        ValueError, match=r"Model type `mystery` has no layout in memit-hf; pass `edit_module_template"
    ):
        make_editor(model, tokenizer, tmp_path)
    edit_template = edited_names(edited.model_type)[0].replace(".0.", ".{}.")
    layer_template = edit_template.split(".mlp.")[0]
    editor = make_editor(
        model, tokenizer, tmp_path, edit_module_template=edit_template, layer_module_template=layer_template
    )
    output = editor.edit(subject_final_requests())
    assert [d.module_name for d in output.deltas] == edited_names(edited.model_type)
    if not has_post_mlp_norm(edited.editor.layout):
        # The same edit as through the layout table, bit for bit.
        assert changed_tensors(model, edited.after) == []
        for ours, theirs in zip(output.deltas, edited.output.deltas):
            assert torch.equal(ours.lora_B, theirs.lora_B) and torch.equal(ours.lora_A, theirs.lora_A)
        return
    # The override templates cannot name a post-MLP norm: the edit writes the plain residual (recomputed here on a
    # fresh copy, bit for bit), unlike the layout table's edit, and on the tiny Gemma (unit gains) it still succeeds.
    assert changed_tensors(model, edited.before) == [name + ".weight" for name in edited_names(edited.model_type)]
    replay = build_tiny_causal_lm(edited.model_type, vocab_size=len(tokenizer))
    targets = output.values.targets.double()
    for i, (layer, delta) in enumerate(zip([0, 1], output.deltas)):
        _, current = compute_keys_and_outputs(
            replay, tokenizer, editor.layout, output.requests, editor.context_templates, layer, 1
        )
        assert torch.equal(delta.lora_B, ((targets - current) / (2 - i)).T.float())
        assert not torch.equal(delta.lora_B, edited.output.deltas[i].lora_B)
        add_delta(replay, delta)
    assert changed_tensors(replay, parameters_snapshot(model)) == []
    requests = subject_final_requests()
    assert next_token_argmax(model, tokenizer, prompts_of(requests)) == first_target_ids(tokenizer, requests)


# --------------------------------------------------------------------------------------------- post-MLP norm
POST_NORM_GAINS = torch.linspace(1.0, 0.25, 32)
"""Uneven gains (a 4x spread) for the post-feedforward norms of a tiny Gemma 3 (hidden size 32); each block gets them
in another order, so that a residual mapped through another block's norm is a different one."""


def gemma_with_uneven_post_norms(tokenizer):
    model = build_tiny_causal_lm("gemma3_text", vocab_size=len(tokenizer))
    with torch.no_grad():
        for i, block in enumerate(model.model.layers):
            gains = POST_NORM_GAINS.roll(11 * i)
            block.post_feedforward_layernorm.weight.copy_(gains - 1)  # Gemma multiplies by 1 + weight
    return model


def test_post_mlp_norm_mapping_is_what_the_update_writes_and_it_matters(tokenizer, tmp_path):
    """Gemma 3 adds `norm(m)`, not the down-projection's output `m`, to the residual stream. With a short z step
    (clamp 0.5) the wanted change of `norm(m)` is small next to `norm(m)` but large next to `m`, so writing the block
    residual into `m` unchanged (the plain residual) overshoots. The update writes the residual mapped through the
    norm (recomputed here on a fresh copy), and reaches far more of the target than the plain one."""
    requests = subject_final_requests()
    model = gemma_with_uneven_post_norms(tokenizer)
    editor = make_editor(model, tokenizer, tmp_path / "mapped", clamp_norm_factor=0.5)
    values = editor.compute_values(requests)
    output = editor.edit(requests, values=values)
    replay = gemma_with_uneven_post_norms(tokenizer)
    targets = values.targets.double()
    plain_residuals = []
    for i, (layer, delta) in enumerate(zip([0, 1], output.deltas)):
        keys, current, edit_outputs = compute_keys_and_outputs(
            replay,
            tokenizer,
            editor.layout,
            output.requests,
            editor.context_templates,
            layer,
            1,
            return_edit_outputs=True,
        )
        residuals = (targets - current) / (2 - i)
        norm = replay.get_submodule(f"model.layers.{layer}.post_feedforward_layernorm")
        mapped = rms_norm_residuals(norm, residuals, edit_outputs)
        assert torch.equal(delta.lora_B, mapped.T.float())  # the same operations on the same weights
        plain_residuals.append(residuals)
        add_delta(replay, delta)
    assert changed_tensors(replay, parameters_snapshot(model)) == []

    # The plain alternative: the same z, statistics and solve, through override templates that name no norm.
    plain_model = gemma_with_uneven_post_norms(tokenizer)
    plain_model.config.model_type = "mystery"
    plain_editor = make_editor(
        plain_model,
        tokenizer,
        tmp_path / "plain",
        clamp_norm_factor=0.5,
        edit_module_template="model.layers.{}.mlp.down_proj",
        layer_module_template="model.layers.{}",
    )
    plain = plain_editor.edit(requests, values=values)
    assert torch.equal(plain.deltas[0].lora_B, plain_residuals[0].T.float())
    mapped_achieved, plain_achieved = output.metrics["residual_achieved"], plain.metrics["residual_achieved"]
    assert mapped_achieved > 0.5 * (1 + plain_achieved), (mapped_achieved, plain_achieved)  # misses < half as much


# ---------------------------------------------------------------------------------- behaviour across edit calls
@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_second_edit_composes_and_restore_is_bit_exact(model_type, tokenizer, tmp_path):
    model = build_tiny_causal_lm(model_type, vocab_size=len(tokenizer))
    original = parameters_snapshot(model)
    editor = make_editor(model, tokenizer, tmp_path, v_num_grad_steps=8)
    requests = subject_final_requests()
    first = editor.edit(requests[:2])
    after_first = parameters_snapshot(model)
    before_second = target_log_probs(model, tokenizer, requests[2:])
    second = editor.edit(requests[2:])
    assert (target_log_probs(model, tokenizer, requests[2:]) > before_second + 0.1).all()
    assert len(editor.history) == 2 and editor.history == [first, second]
    for name in edited_names(model_type):
        weight = model.get_submodule(name).weight.detach()
        first_delta, second_delta = (
            next(d for d in out.deltas if d.module_name == name).dense().double() for out in (first, second)
        )
        middle = after_first[name + ".weight"]
        # One float32 rounding per edit: of fl(after_first + second), and before it of fl(original + first).
        assert_weight_moved_by(weight, middle, second_delta, roundings=weight)
        assert_weight_moved_by(
            weight, original[name + ".weight"], first_delta + second_delta, roundings=weight.abs() + middle.abs()
        )
    editor.restore()
    assert changed_tensors(model, original) == []
    assert editor.history == []
    editor.restore()  # idempotent
    assert changed_tensors(model, original) == []


def test_same_seed_gives_bitwise_identical_edits(edited, tokenizer, tmp_path):
    """A second editor with the same arguments, on a second copy of the model, with its own statistics and a
    different global RNG state, produces the same weights bit for bit."""
    model = build_tiny_causal_lm(edited.model_type, vocab_size=len(tokenizer))
    torch.manual_seed(1234)  # the global generator must not matter
    editor = make_editor(model, tokenizer, tmp_path)
    output = editor.edit(subject_final_requests())
    assert changed_tensors(model, edited.after) == []
    assert editor.context_templates == edited.editor.context_templates
    torch.testing.assert_close(output.values.targets, edited.output.values.targets, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------ ROME
@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_rome_edit_writes_every_residual_exactly(model_type, tokenizer, tmp_path):
    """ROME through the Editor: one module changes, by an update of rank <= n that maps each request's key exactly
    to its residual (equality-constrained), and every target becomes the argmax. (Through a post-MLP norm one layer
    moves the block output only over the norm's output ellipsoid, which on the tiny Gemma does not reach every
    target: there every target only becomes likelier.)"""
    model = build_tiny_causal_lm(model_type, vocab_size=len(tokenizer))
    before = parameters_snapshot(model)
    editor = make_editor(model, tokenizer, tmp_path, algorithm="rome", layers=[1])
    requests = subject_final_requests()
    log_probs = target_log_probs(model, tokenizer, requests)
    output = editor.edit(requests)
    if has_post_mlp_norm(editor.layout):
        assert (target_log_probs(model, tokenizer, requests) > log_probs).all()
    else:
        assert next_token_argmax(model, tokenizer, prompts_of(requests)) == first_target_ids(tokenizer, requests)
    (delta,) = output.deltas
    name = edited_names(model_type)[1]
    assert delta.module_name == name and changed_tensors(model, before) == [name + ".weight"]
    n = len(requests)
    assert delta.lora_B.shape[1] == delta.lora_A.shape[0] == n  # Delta = B A has rank <= n
    after = model.get_submodule(name).weight.detach()
    assert_weight_moved_by(after, before[name + ".weight"], delta.dense(), roundings=after)

    # The keys and residuals of the edit, recomputed on a fresh copy.
    replay = build_tiny_causal_lm(model_type, vocab_size=len(tokenizer))
    keys, current, edit_outputs = compute_keys_and_outputs(
        replay, tokenizer, editor.layout, output.requests, editor.context_templates, 1, 1, return_edit_outputs=True
    )
    residuals = output.values.targets.double() - current  # one layer: the whole residual
    if has_post_mlp_norm(editor.layout):
        norm = replay.get_submodule(editor.layout.post_mlp_norm_name(1))
        residuals = rms_norm_residuals(norm, residuals, edit_outputs)
    B, A = delta.lora_B.double(), delta.lora_A.double()
    written = B @ (A @ keys.T)  # (d_out, n): what the update adds to the output at each key
    # In float64 the solve writes R exactly up to the backward error of the Cholesky solve of the n x n system
    # G = K C^-1 K^T ((3 n + 1) n EPS64 ||G||_2 ||B||, Higham Thm 10.4) and the products' rounding (d EPS64 times
    # their magnitudes); the stored float32 factors add (2 UNIT32 + UNIT32^2) |B||A||K^T| elementwise.
    magnitudes = B.abs() @ (A.abs() @ keys.T.abs())
    gram = keys @ A.T  # = K C^-1 K^T, up to float32 rounding of A
    d = keys.shape[1]
    float64_part = (3 * n + 1) * n * EPS64 * torch.linalg.matrix_norm(gram, ord=2) * B.norm()
    float64_part = float64_part + d * EPS64 * magnitudes.norm()
    bound = (2 * UNIT32 + UNIT32**2) * magnitudes.norm() + float64_part
    assert (written - residuals.T).norm() <= bound < 1e-5 * residuals.norm()


# ----------------------------------------------------------------------------------------------------- bfloat16
def test_bfloat16_model_is_edited_in_its_dtype(tokenizer, tmp_path):
    """A bfloat16 model (on the CPU) is edited in its dtype: the update of the exported factors, added in float32
    and rounded once to bfloat16; the adapter holds those factors bit for bit; restore is bit-exact."""
    base = build_tiny_causal_lm("llama", vocab_size=len(tokenizer)).to(torch.bfloat16)
    model = copy.deepcopy(base)
    before = parameters_snapshot(model)
    editor = make_editor(model, tokenizer, tmp_path / "stats")
    requests = subject_final_requests()
    before_log_probs = target_log_probs(model, tokenizer, requests)
    output = editor.edit(requests)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert changed_tensors(model, before) == [f"{d.module_name}.weight" for d in output.deltas]
    assert (target_log_probs(model, tokenizer, requests) > before_log_probs).all()
    editor.save_adapter(tmp_path / "adapter")
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    for delta in output.deltas:
        lora_A = tensors[f"base_model.model.{delta.module_name}.lora_A.weight"]
        lora_B = tensors[f"base_model.model.{delta.module_name}.lora_B.weight"]
        assert torch.equal(lora_A, delta.lora_A) and torch.equal(lora_B, delta.lora_B)
        original = before[f"{delta.module_name}.weight"]
        expected = (original.float() + lora_B @ lora_A).to(torch.bfloat16)
        assert torch.equal(model.get_submodule(delta.module_name).weight, expected)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter")
    merged = peft_model.merge_and_unload()
    unit = 2**-8  # bfloat16 unit roundoff (8 significant bits)
    for delta in output.deltas:
        # peft merges fl(W + fl(B A)) in bfloat16 (its factors possibly rounded to bfloat16 first: 2 unit |B||A|
        # more); ours is fl(W + B A). Each is within its roundings of the exact sum.
        ours = model.get_submodule(delta.module_name).weight.float()
        theirs = merged.get_submodule(delta.module_name).weight.float()
        magnitudes = delta.lora_B.abs() @ delta.lora_A.abs()
        assert ((theirs - ours).abs() <= unit * (3 * magnitudes + theirs.abs() + ours.abs())).all()
    editor.restore()
    assert changed_tensors(model, before) == []


def logits_of(model, tokenizer, texts=("The city of the Eiffel Tower", "I think the iPhone is")) -> torch.Tensor:
    batch = tokenizer(list(texts), return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits.float()


def test_merge_edits_false_keeps_the_weights_and_applies_the_exact_update(tokenizer, tmp_path):
    """With `merge_edits=False` the weights never change; the model computes the edit through float32 output hooks,
    which equal the merged edit in float32 (up to float32 rounding, measured against the exact float64 edit);
    `unedited()`, `rollback`, `restore` and `merge_and_save` see or remove the hooks, bit for bit."""
    base = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    merged_model = copy.deepcopy(base)
    merged = make_editor(merged_model, tokenizer, tmp_path / "stats").edit(subject_final_requests())
    model = copy.deepcopy(base)
    before = parameters_snapshot(model)
    editor = make_editor(model, tokenizer, tmp_path / "stats", merge_edits=False)
    output = editor.edit(subject_final_requests())
    assert changed_tensors(model, before) == [] and output.metrics["merge_rounding_error"] == 0.0
    assert 0 < merged.metrics["merge_rounding_error"] < 1e-5  # float32: a few units of roundoff of |W| / |Delta|
    exact = copy.deepcopy(base).double()
    for delta in output.deltas:
        with torch.no_grad():
            exact.get_submodule(delta.module_name).weight += delta.lora_B.double() @ delta.lora_A.double()
    truth = logits_of(exact, tokenizer).double()
    scale = float(truth.abs().max())
    budget = 4 * float((logits_of(merged_model, tokenizer).double() - truth).abs().max())
    budget += 8 * torch.finfo(torch.float32).eps * scale
    assert float((logits_of(model, tokenizer).double() - truth).abs().max()) <= budget
    unedited = logits_of(base, tokenizer)
    with editor.unedited():
        assert torch.equal(logits_of(model, tokenizer), unedited)
    editor.merge_and_save(tmp_path / "merged", base_model_name_or_path="tiny/base")
    assert changed_tensors(model, before) == []  # merged for the save only
    saved = load_file(tmp_path / "merged" / "model.safetensors")
    for delta in output.deltas:  # the weights plus the factors, added in float32 as an in-place merge does
        expected = before[f"{delta.module_name}.weight"] + delta.lora_B @ delta.lora_A
        assert torch.equal(saved[f"{delta.module_name}.weight"], expected)
    second = editor.edit(subject_final_requests()[:2])
    assert changed_tensors(model, before) == [] and len(editor.history) == 2
    with pytest.raises(ValueError, match="merge_edits=False"):
        editor.args.merge_edits = True
        editor.edit(subject_final_requests()[:1])
    editor.args.merge_edits = False
    assert len(second.deltas) == 2
    editor.rollback()
    assert float((logits_of(model, tokenizer).double() - truth).abs().max()) <= budget
    editor.restore()
    assert torch.equal(logits_of(model, tokenizer), unedited) and changed_tensors(model, before) == []


def test_merge_edits_false_keeps_a_bfloat16_edit_that_merging_rounds_away(tokenizer, tmp_path):
    """In bfloat16, merging rounds W + Delta to 8 significant bits: `merge_rounding_error` reports what it lost; the
    hooks keep the float32 update, so the model is closer to the exact edit."""
    base = build_tiny_causal_lm("llama", vocab_size=len(tokenizer)).to(torch.bfloat16)
    merged_model, hooked_model = copy.deepcopy(base), copy.deepcopy(base)
    merged = make_editor(merged_model, tokenizer, tmp_path / "stats").edit(subject_final_requests())
    editor = make_editor(hooked_model, tokenizer, tmp_path / "stats", merge_edits=False)
    editor.edit(subject_final_requests(), values=merged.values)  # the same targets: only the application differs
    deltas = merged.deltas
    # Rounding each element of W + Delta to bfloat16 loses up to 2^-9 of it: relative to ||Delta|| that is
    # 2^-9 ||W + Delta|| / ||Delta|| at most, and well above float32's 1e-7 for these weights.
    bounds = []
    for delta in deltas:
        weight = base.get_submodule(delta.module_name).weight.detach().double()
        dense = delta.lora_B.double() @ delta.lora_A.double()
        bounds.append(2**-9 * float((weight + dense).norm() / dense.norm()))
    assert 1e-5 < merged.metrics["merge_rounding_error"] <= max(bounds)
    exact = copy.deepcopy(base).double()
    for delta in deltas:
        with torch.no_grad():
            exact.get_submodule(delta.module_name).weight += delta.lora_B.double() @ delta.lora_A.double()
    truth = logits_of(exact, tokenizer).double()
    merged_error = float((logits_of(merged_model, tokenizer).double() - truth).abs().max())
    hooked_error = float((logits_of(hooked_model, tokenizer).double() - truth).abs().max())
    assert hooked_error <= merged_error


def test_failed_edit_with_hooks_removes_its_hooks(tokenizer, tmp_path):
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    unedited = logits_of(model, tokenizer)
    editor = make_editor(model, tokenizer, tmp_path, callbacks=[FailAtLayer(1)], v_num_grad_steps=3, merge_edits=False)
    with pytest.raises(RuntimeError, match="callback failed at layer 1"):
        editor.edit(subject_final_requests())
    assert torch.equal(logits_of(model, tokenizer), unedited) and editor.history == []


# ------------------------------------------------------------------------------------------------- atomicity
class FailAtLayer(EditorCallback):
    def __init__(self, layer: int, error: type[BaseException] = RuntimeError):
        self.layer, self.error, self.events = layer, error, []

    def on_edit_begin(self, editor, requests):
        self.events.append(("begin", len(requests)))

    def on_layer_end(self, editor, layer, delta):
        self.events.append(("layer", layer))
        if layer == self.layer:
            raise self.error(f"callback failed at layer {layer}")

    def on_edit_end(self, editor, output):
        self.events.append(("end", len(output.deltas)))


@pytest.mark.parametrize(
    "model_type, error",
    [(model_type, RuntimeError) for model_type in TINY_MODEL_TYPES] + [("llama", KeyboardInterrupt)],
)
def test_exception_mid_edit_leaves_weights_unchanged(model_type, error, tokenizer, tmp_path):
    model = build_tiny_causal_lm(model_type, vocab_size=len(tokenizer))
    original = parameters_snapshot(model)
    callback = FailAtLayer(1, error)
    editor = make_editor(model, tokenizer, tmp_path, callbacks=[callback], v_num_grad_steps=3)
    with pytest.raises(error, match="callback failed at layer 1"):
        editor.edit(subject_final_requests())
    assert callback.events == [("begin", 4), ("layer", 0), ("layer", 1)]
    assert changed_tensors(model, original) == []
    assert editor.history == []
    editor.restore()  # nothing to restore: still the original
    assert changed_tensors(model, original) == []
    # The editor stays usable and its later restore returns to the original weights.
    editor.callbacks = []
    editor.edit(subject_final_requests())
    assert changed_tensors(model, original) != []
    editor.restore()
    assert changed_tensors(model, original) == []


class FailingMEMIT(MEMIT):
    """MEMIT whose solve fails (or returns a non-finite update) at the `fail_at`-th layer."""

    def __init__(self, config, fail_at: int = 2, nan: bool = False):
        super().__init__(config)
        self.fail_at, self.nan, self.calls = fail_at, nan, []

    def solve(self, problem):
        self.calls.append(problem.module_name)
        lora_B, lora_A = super().solve(problem)
        if len(self.calls) == self.fail_at:
            if not self.nan:
                raise IllConditionedError("solver failed at the second layer")
            lora_B = lora_B.clone()
            lora_B[0, 0] = float("nan")
        return lora_B, lora_A


def failing_editor(model, tokenizer, tmp_path, **kwargs):
    editor = make_editor(model, tokenizer, tmp_path, v_num_grad_steps=3)
    editor.algorithm = FailingMEMIT(editor.resolved_args.method_config, **kwargs)
    return editor


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_solver_failure_at_second_layer_leaves_weights_unchanged(model_type, tokenizer, tmp_path):
    model = build_tiny_causal_lm(model_type, vocab_size=len(tokenizer))
    original = parameters_snapshot(model)
    editor = failing_editor(model, tokenizer, tmp_path)
    with pytest.raises(IllConditionedError, match="solver failed at the second layer"):
        editor.edit(subject_final_requests())
    assert len(editor.algorithm.calls) == 2
    assert changed_tensors(model, original) == []
    assert editor.history == []


@pytest.mark.parametrize("nan", [False, True], ids=["raises", "non_finite"])
def test_failure_in_a_second_edit_returns_to_the_first_edit(nan, tokenizer, tmp_path):
    """A second `edit()` that fails after its first layer was applied leaves the weights of the first edit, bit for
    bit, and the history holding the first edit alone; `unedited()` and `restore()` still reach the original."""
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    original = parameters_snapshot(model)
    editor = make_editor(model, tokenizer, tmp_path, v_num_grad_steps=3)
    requests = subject_final_requests()
    first = editor.edit(requests[:2])
    after_first = parameters_snapshot(model)
    assert changed_tensors(model, original) != []
    editor.algorithm = FailingMEMIT(editor.resolved_args.method_config, nan=nan)
    message = r"The update of `model\.layers\.1\.mlp\.down_proj` is not finite" if nan else "failed at the second"
    with pytest.raises(ValueError, match=message):
        editor.edit(requests[2:])
    assert editor.algorithm.calls == edited_names("llama")  # the first layer was solved and applied
    assert changed_tensors(model, after_first) == []
    assert editor.history == [first]
    with editor.unedited():
        assert changed_tensors(model, original) == []
    assert changed_tensors(model, after_first) == []
    editor.restore()
    assert changed_tensors(model, original) == []


def test_non_finite_update_is_rejected(tokenizer, tmp_path):
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    original = parameters_snapshot(model)
    editor = failing_editor(model, tokenizer, tmp_path, nan=True)
    with pytest.raises(ValueError, match=r"The update of `model\.layers\.1\.mlp\.down_proj` is not finite"):
        editor.edit(subject_final_requests())
    assert changed_tensors(model, original) == []


def test_algorithm_setter_checks_the_method(tokenizer, tmp_path):
    editor = make_editor(build_tiny_causal_lm("llama", vocab_size=len(tokenizer)), tokenizer, tmp_path)
    with pytest.raises(TypeError, match="`algorithm` must be an `EditAlgorithm`, got str"):
        editor.algorithm = "memit"
    with pytest.raises(ValueError, match=r"but `args` say `memit` \{'mom2_update_weight': 1.0\}"):
        editor.algorithm = MEMIT(MEMITConfig(mom2_update_weight=2.0))


def test_non_finite_target_values_are_rejected(tokenizer, tmp_path):
    model = build_tiny_causal_lm("gpt2", vocab_size=len(tokenizer))
    original = parameters_snapshot(model)
    editor = make_editor(model, tokenizer, tmp_path, v_num_grad_steps=2)
    values = editor.compute_values(subject_final_requests())
    values.targets[2, 5] = float("inf")
    with pytest.raises(ValueError, match=r"Target values are not finite for requests \[2\]"):
        editor.edit(subject_final_requests(), values=values)
    assert changed_tensors(model, original) == []


def test_edit_with_precomputed_values_equals_a_plain_edit(tokenizer, tmp_path):
    """`compute_values` + `edit(values=...)` is the plain edit, bit for bit; values of other requests are refused."""
    requests = subject_final_requests()
    plain_model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    plain = make_editor(plain_model, tokenizer, tmp_path, v_num_grad_steps=5).edit(requests)
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    editor = make_editor(model, tokenizer, tmp_path, v_num_grad_steps=5)
    values = editor.compute_values(requests)
    assert torch.equal(values.targets, plain.values.targets) and values.z_layer == 1
    with pytest.raises(ValueError, match=r"`values` hold 4 requests at layer 1, but the edit has 3 requests"):
        editor.edit(requests[:3], values=values)
    output = editor.edit(requests, values=values)
    assert output.values is values
    for mine, theirs in zip(output.deltas, plain.deltas):
        assert torch.equal(mine.dense(), theirs.dense())
    assert changed_tensors(model, parameters_snapshot(plain_model)) == []


class StageRecorder(EditorCallback):
    def __init__(self):
        self.events = []

    def on_edit_begin(self, editor, requests):
        self.events.append("begin")

    def on_values_begin(self, editor, requests):
        self.events.append("values")


def test_ill_conditioned_covariance_fails_before_the_z_optimisation(tokenizer, tmp_path):
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    original = parameters_snapshot(model)
    recorder = StageRecorder()
    # Fewer statistics tokens than the down-projection's input width: C is singular, so lambda C cannot be factored.
    editor = make_editor(model, tokenizer, tmp_path, stats_num_tokens=8, callbacks=[recorder])
    with pytest.raises(
        IllConditionedError, match=r"lambda \* C of `model\.layers\.0\.mlp\.down_proj` is not numerically positive"
    ):
        editor.edit(subject_final_requests())
    assert recorder.events == ["begin"]  # the z optimisation never started
    assert changed_tensors(model, original) == []


# ------------------------------------------------------------------------------------------------ validation
BAD_REQUESTS = [
    (
        1,
        {"prompt": "The city of", "subject": "the Eiffel Tower", "target_new": "Rome"},
        r"^Request 1: field `prompt` must contain exactly one `\{\}` placeholder",
    ),
    (
        2,
        {"prompt": "The city of {}", "subject": "the Eiffel Tower", "target_new": "   "},
        r"^Request 2: field `target_new` must be .* \(got the empty target '   '\)",
    ),
    (
        3,
        {"prompt": "The capital of France", "subject": "Italy", "target_new": "Rome", "ground_truth": "Paris"},
        r"^Request 3: field `prompt` must contain the subject 'Italy' to be turned into a template",
    ),
    (
        0,
        {"prompt": "The city of {} {}", "subject": "Rome", "target_new": "Paris"},
        r"^Request 0: field `prompt` must contain exactly one `\{\}`",
    ),
    (2, {"prompt": "I think {}", "subject": " ", "target_new": "Paris"}, r"^Request 2: field `subject` must be"),
    (
        1,
        {"prompt": "The cit{} of", "subject": "y", "target_new": "Rome"},  # " city" is one token
        r"^Request 1: field `subject` \('y'\) is not found as its own tokens in the prompt 'The city of'",
    ),
]


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
@pytest.mark.parametrize(
    "index, bad, message", BAD_REQUESTS, ids=["no_braces", "empty_target", "subject", "two", "blank", "merged"]
)
def test_bad_requests_fail_before_any_work(model_type, index, bad, message, tokenizer, tmp_path):
    model = build_tiny_causal_lm(model_type, vocab_size=len(tokenizer))
    original = parameters_snapshot(model)
    requests = subject_final_requests()
    requests.insert(index, bad)
    recorder = StageRecorder()
    editor = make_editor(model, tokenizer, tmp_path, callbacks=[recorder])
    with pytest.raises(ValueError, match=message):
        editor.edit(requests)
    assert recorder.events == []  # the edit never began: no templates, statistics or z optimisation
    assert editor.statistics.num_collections == 0
    assert changed_tensors(model, original) == []
    assert not list(tmp_path.iterdir())  # no statistics were written


def test_empty_requests_and_missing_tokenizer(tokenizer, tmp_path):
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    with pytest.raises(ValueError, match=r"`requests` is empty"):
        make_editor(model, tokenizer, tmp_path).edit([])
    with pytest.raises(ValueError, match=r"`requests` is empty"):
        make_editor(model, tokenizer, tmp_path).compute_values([])
    with pytest.raises(ValueError, match=r"none could be found for the model: the model records no `name_or_path`"):
        Editor(model, args=tiny_editing_arguments(tmp_path))
    with pytest.raises(TypeError, match=r"`model` must be a `PreTrainedModel` or a model id/path, got Linear"):
        Editor(torch.nn.Linear(2, 2), args=tiny_editing_arguments(tmp_path), processing_class=tokenizer)
    with pytest.raises(ValueError, match=r"`layers` has 3, outside the model's 3 layers"):
        make_editor(model, tokenizer, tmp_path, layers=[2, 3]).edit(subject_final_requests())


def test_callbacks_see_every_event(tokenizer, tmp_path):
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    callback = FailAtLayer(layer=-1)
    output = make_editor(model, tokenizer, tmp_path, callbacks=[callback], v_num_grad_steps=2).edit(
        subject_final_requests()
    )
    assert isinstance(output, EditOutput)
    assert callback.events == [("begin", 4), ("layer", 0), ("layer", 1), ("end", 2)]


# -------------------------------------------------------------------------------------------- statistics guard
def test_statistics_after_an_edit_are_those_of_the_original_model(tokenizer, tmp_path):
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    editor = make_editor(model, tokenizer, tmp_path / "edited")
    editor.edit(subject_final_requests())
    after_edit = editor.get_statistics([2])["model.layers.2.mlp.down_proj"]
    pristine = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    reference = make_editor(pristine, tokenizer, tmp_path / "pristine").get_statistics([2])
    expected = reference["model.layers.2.mlp.down_proj"]
    # The same weights, tokens and operations: the sums are bit-identical, and so is the fingerprint.
    assert torch.equal(after_edit.moment.total, expected.moment.total) and after_edit.key == expected.key


# ---------------------------------------------------------------------------------------------------- run mode
def test_edit_runs_in_eval_mode_and_restores_the_train_mode(tokenizer, tmp_path):
    """A GPT-2 with dropout in train mode: the edit (statistics, templates, z, keys) runs with dropout off, so it
    equals the edit of the same model in eval mode bit for bit, and the model comes back in train mode."""
    config_overrides = dict(resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5)
    training = build_tiny_causal_lm("gpt2", vocab_size=len(tokenizer), **config_overrides).train()
    training.transformer.h[0].eval()  # a submodule's own mode is restored too
    evaluating = build_tiny_causal_lm("gpt2", vocab_size=len(tokenizer), **config_overrides).eval()
    requests = subject_final_requests()
    trained = make_editor(training, tokenizer, tmp_path / "a", v_num_grad_steps=4).edit(requests)
    reference = make_editor(evaluating, tokenizer, tmp_path / "b", v_num_grad_steps=4).edit(requests)
    assert training.training and not training.transformer.h[0].training and training.transformer.h[1].training
    assert torch.equal(trained.values.targets, reference.values.targets)
    for mine, theirs in zip(trained.deltas, reference.deltas):
        assert torch.equal(mine.dense(), theirs.dense())


def test_an_edit_restores_every_requires_grad_flag(tokenizer, tmp_path):
    """The z optimisation freezes the parameters for its backward passes; every parameter gets its own
    `requires_grad` back, after a successful edit and after a failed one (an edited weight that required grad too)."""
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    for i, parameter in enumerate(model.parameters()):
        parameter.requires_grad_(i % 3 == 0)
    model.get_submodule(edited_names("llama")[0]).weight.requires_grad_(True)
    model.get_submodule(edited_names("llama")[1]).weight.requires_grad_(False)
    flags = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    assert 0 < sum(flags.values()) < len(flags)
    editor = make_editor(model, tokenizer, tmp_path, v_num_grad_steps=3)
    editor.edit(subject_final_requests())
    assert {name: parameter.requires_grad for name, parameter in model.named_parameters()} == flags
    editor.callbacks = [FailAtLayer(1)]
    with pytest.raises(RuntimeError, match="callback failed at layer 1"):
        editor.edit(subject_final_requests())
    assert {name: parameter.requires_grad for name, parameter in model.named_parameters()} == flags


# ------------------------------------------------------------------------------------- settings reach the edit
def test_early_stop_margin_and_patience_reach_the_z_optimisation(tokenizer, tmp_path):
    """The loss rule alone never stops a tiny model's request (9 steps of 10 iterations each). With a margin every
    target reaches from the first iteration (-1000 nats), each request takes exactly `patience` steps; with one no
    target reaches (1000 nats), all of them."""
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    requests = subject_final_requests()
    editor = make_editor(model, tokenizer, tmp_path, v_num_grad_steps=10)
    assert editor.compute_values(requests).steps.tolist() == [9, 9, 9, 9]
    editor.args = tiny_editing_arguments(tmp_path, v_num_grad_steps=10, v_early_stop_margin=1000.0)
    assert editor.compute_values(requests).steps.tolist() == [9, 9, 9, 9]
    editor.args = tiny_editing_arguments(
        tmp_path, v_num_grad_steps=10, v_early_stop_margin=-1000.0, v_early_stop_patience=0
    )
    assert editor.compute_values(requests).steps.tolist() == [0, 0, 0, 0]
    editor.args = tiny_editing_arguments(
        tmp_path, v_num_grad_steps=10, v_early_stop_margin=-1000.0, v_early_stop_patience=3
    )
    output = editor.edit(requests)
    assert output.values.steps.tolist() == [3, 3, 3, 3] and output.metrics["z_mean_steps"] == 3.0


def test_v_batch_size_sets_the_chunks_of_the_z_optimisation(tokenizer, tmp_path):
    """`v_batch_size` requests per chunk, as `plan_chunks` cuts them; by default (`None`) 16 on a CPU (one chunk
    here)."""
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    requests = subject_final_requests()
    editor = make_editor(model, tokenizer, tmp_path, v_num_grad_steps=2, v_batch_size=3)
    values = editor.compute_values(requests)
    assert values.chunks == plan_chunks(tokenizer, load_requests(requests), 3)
    assert [len(chunk) for chunk in values.chunks] == [2, 2] and len(values.schedule) == 2
    editor.args = tiny_editing_arguments(tmp_path, v_num_grad_steps=2)
    assert editor.resolved_args.v_batch_size is None  # the z optimisation picks the device's chunk size
    assert [len(chunk) for chunk in editor.compute_values(requests).chunks] == [4]


def test_editor_checks_the_prefix_cache_shortcut_once(tokenizer, tmp_path):
    """The KV-cache shortcut's self-check (a chunk of two requests built and run twice) runs at an editor's first z
    optimisation only: a second call runs fewer forwards of the model and gives the same z."""
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    requests = subject_final_requests()
    editor = make_editor(model, tokenizer, tmp_path, v_num_grad_steps=2)
    templates = editor.context_templates  # sampled before counting (they run the model too)
    assert templates
    forwards = []
    handle = model.base_model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    try:
        first = editor.compute_values(requests)
        first_forwards = len(forwards)
        forwards.clear()
        second = editor.compute_values(requests)
    finally:
        handle.remove()
    # The check: block outputs, the template prefixes, the prefix caches and the plain and cached forwards of a chunk.
    assert first_forwards >= len(forwards) + 4
    assert torch.equal(first.targets, second.targets)


def test_v_autocast_dtype_runs_the_z_tail_in_bfloat16(tokenizer, tmp_path):
    """With `v_autocast_dtype="bfloat16"` the blocks after the z layer compute in bfloat16: the losses move by
    bfloat16 rounding (one block and the head: under 8 units of 2^-8), the block-z outputs not at all."""
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    requests = subject_final_requests()
    exact = make_editor(model, tokenizer, tmp_path, v_num_grad_steps=3).compute_values(requests)
    editor = make_editor(model, tokenizer, tmp_path, v_num_grad_steps=3, v_autocast_dtype="bfloat16")
    low = editor.compute_values(requests)
    assert not torch.equal(low.initial_loss, exact.initial_loss)  # bfloat16 really ran
    torch.testing.assert_close(low.initial_loss, exact.initial_loss, rtol=8 * 2**-8, atol=0)
    torch.testing.assert_close(low.initial, exact.initial, rtol=0, atol=0)
    assert low.targets.dtype == torch.float32


def test_context_template_chat_adds_the_chat_template_groups(tmp_path):
    """With a tokenizer that has a chat template, the default (`context_template_chat=None`) adds one group per chat
    form: the prompt as the user turn with the assistant's turn opened (`"question"`), and the same with the prompt
    restated by the assistant (`"answer"`); `False` adds none, as a tokenizer without a chat template. The z
    optimisation runs over them too: the same block-z output of the bare prompt, another loss and other targets."""
    tokenizer = build_tiny_chat_tokenizer()
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    requests = subject_final_requests()
    plain = make_editor(model, tokenizer, tmp_path, v_num_grad_steps=3, context_template_chat=False)
    chat = make_editor(model, tokenizer, tmp_path, v_num_grad_steps=3)
    assert len(plain.context_templates) == 2 and chat.context_templates[:2] == plain.context_templates
    question = "<s>user: {}\n<s>assistant:"
    assert chat.context_templates[2:] == [[question], [question + "{}"]]
    answer_only = make_editor(
        model,
        tokenizer,
        tmp_path,
        v_num_grad_steps=3,
        context_template_chat=True,
        context_template_chat_forms=["answer"],
    )
    assert answer_only.context_templates[2:] == [[question + "{}"]]
    no_template = make_editor(model, build_tiny_tokenizer(), tmp_path, v_num_grad_steps=3)
    assert len(no_template.context_templates) == 2
    plain_values, chat_values = plain.compute_values(requests), chat.compute_values(requests)
    assert torch.equal(chat_values.initial, plain_values.initial)
    assert (chat_values.initial_loss != plain_values.initial_loss).all()
    assert not torch.equal(chat_values.targets, plain_values.targets)
    with pytest.raises(ValueError, match="context_template_chat_forms"):
        tiny_editing_arguments(tmp_path, context_template_chat_forms=["statement"])


def test_model_init_kwargs_reach_from_pretrained(tokenizer, tmp_path):
    """When `model` is a saved folder, `model_init_kwargs` go to `from_pretrained` (the library's float32 default
    gives way to the `dtype` asked for)."""
    folder = tmp_path / "tiny-llama"
    build_tiny_causal_lm("llama", vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert Editor(str(folder), args=tiny_editing_arguments(tmp_path)).model.dtype == torch.float32
    editor = Editor(str(folder), args=tiny_editing_arguments(tmp_path, model_init_kwargs={"dtype": "bfloat16"}))
    assert editor.model.dtype == torch.bfloat16 and len(editor.tokenizer) == len(tokenizer)


def test_stats_repo_revision_reaches_the_hub_download(tokenizer, tmp_path):
    """`stats_repo_revision` is the revision whose statistics files are fetched (the tensors then come from the
    commit it resolved to); the statistics are those pushed."""
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    local = make_editor(model, tokenizer, tmp_path / "local").get_statistics([0, 1])
    with fake_dataset_hub(tmp_path / "hub") as hub:
        push_statistics(
            "me/tiny-stats", [layer.fingerprint for layer in local.values()], StatisticsCache(tmp_path / "local")
        )
        args = tiny_editing_arguments(tmp_path / "fresh", stats_repo="me/tiny-stats", stats_repo_revision="v1.0")
        fetched = Editor(model, args=args, processing_class=tokenizer).get_statistics([0, 1])
    assert [download["revision"] for download in hub.downloads] == ["v1.0", FAKE_COMMIT]
    assert fetched.keys() == local.keys()
    assert all(torch.equal(fetched[name].moment.total, local[name].moment.total) for name in local)
