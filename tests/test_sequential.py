"""Sequential editing: accumulated-key MEMIT, EMMET and AlphaEdit on the stateful interface, what their state keeps
of earlier batches, its atomicity, and exact rollback."""

import pytest
import torch

from memit_hf.algorithms import AlphaEdit, LayerProblem, get_algorithm
from memit_hf.editor import Editor, EditorCallback
from memit_hf.keys import compute_keys_and_outputs
from memit_hf.statistics import LayerStatistics, SecondMoment
from tests.testing_utils import (
    build_tiny_causal_lm,
    build_tiny_tokenizer,
    changed_tensors,
    next_token_argmax,
    parameters_snapshot,
    subject_final_requests,
    tiny_corpus,
    tiny_editing_arguments,
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def random_statistics(d_in: int, seed: int = 0) -> LayerStatistics:
    generator = torch.Generator().manual_seed(seed)
    samples = torch.randn(4 * d_in, d_in, generator=generator, dtype=torch.float64)
    covariance = samples.T @ samples / samples.shape[0]
    return LayerStatistics("m", SecondMoment(covariance, 1), {"corpus": "test", "num_tokens": 1}, "k", "collected")


def batch(n: int, d_in: int, d_out: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, d_in, generator=generator, dtype=torch.float64)
    return keys, torch.randn(n, d_out, generator=generator, dtype=torch.float64)


def test_accumulated_key_memit_preserves_the_keys_of_earlier_batches():
    """Batch 2 solves Delta (lambda C + K1^T K1 + K2^T K2) = R2^T K2 (its defining equation, to float64 rounding),
    so with a small lambda the keys of batch 1 keep their outputs: Delta K1^T -> 0 as lambda -> 0, where plain MEMIT
    moves them by about as much as it writes."""
    d_in, d_out, lam = 24, 8, 1e-6
    statistics = random_statistics(d_in)
    (k1, r1), (k2, r2) = batch(5, d_in, d_out, 1), batch(5, d_in, d_out, 2)
    sequential = get_algorithm("memit_seq", {"mom2_update_weight": lam})
    sequential.prepare(statistics)
    sequential.solve(LayerProblem("m", 0, k1, r1, statistics))
    sequential.commit()
    assert torch.equal(sequential.layer_state("m")["key_gram"], k1.T @ k1)
    delta = torch.matmul(*sequential.solve(LayerProblem("m", 0, k2, r2, statistics)))
    system = lam * statistics.covariance() + k1.T @ k1 + k2.T @ k2
    rhs = r2.T @ k2
    # float64 solve of a system with condition ~1e6 (lambda 1e-6 against unit keys): backward error ~1e6 * eps64
    assert float((delta @ system - rhs).norm() / rhs.norm()) < 1e-8
    plain = get_algorithm("memit", {"mom2_update_weight": lam})
    plain_delta = torch.matmul(*plain.solve(LayerProblem("m", 0, k2, r2, statistics)))
    kept = float((delta @ k1.T).norm() / r2.norm())
    moved = float((plain_delta @ k1.T).norm() / r2.norm())
    assert kept < 1e-4 and moved > 0.1  # O(lambda) against O(1)


def test_alphaedit_leaves_preserved_keys_unchanged():
    """For x in the preserved span (P x = 0), Delta x = 0 exactly in exact arithmetic; in float64 it is at rounding
    level against the update's size."""
    d_in, d_out = 24, 8
    statistics = random_statistics(d_in, seed=3)
    alphaedit = get_algorithm("alphaedit", {"nullspace_threshold": 0.5})
    alphaedit.prepare(statistics)
    rank = int(alphaedit.diagnostics()["nullspace_rank/m"])
    assert 0 < rank < d_in
    keys, residuals = batch(4, d_in, d_out, 4)
    delta = torch.matmul(*alphaedit.solve(LayerProblem("m", 0, keys, residuals, statistics)))
    eigenvalues, eigenvectors = torch.linalg.eigh(statistics.covariance())
    preserved = eigenvectors[:, eigenvalues >= 0.5]  # (d_in, d_in - rank): the published, absolute rule
    assert preserved.shape[1] == d_in - rank
    assert float((delta @ preserved).norm() / delta.norm()) < 1e-12
    assert torch.linalg.matrix_rank(delta) <= len(keys)


def test_alphaedit_energy_rule_keeps_the_smallest_directions_within_the_energy_share():
    d_in, d_out = 24, 8
    statistics = random_statistics(d_in, seed=3)
    eigenvalues, eigenvectors = torch.linalg.eigh(statistics.covariance())
    share = 0.2
    # The null space: as many of the smallest eigenvalues as sum to at most 20 % of the trace.
    expected_rank = int((torch.cumsum(eigenvalues, 0) <= share * eigenvalues.sum()).sum())
    assert 0 < expected_rank < d_in
    alphaedit = get_algorithm("alphaedit", {"nullspace_energy": share, "nullspace_threshold": 0.999})
    alphaedit.prepare(statistics)
    diagnostics = alphaedit.diagnostics()
    assert int(diagnostics["nullspace_rank/m"]) == expected_rank  # the energy rule, not the (ignored) threshold
    energy = float(eigenvalues[:expected_rank].sum() / eigenvalues.sum())
    assert diagnostics["nullspace_energy/m"] == pytest.approx(energy, rel=1e-12) and energy <= share
    keys, residuals = batch(4, d_in, d_out, 4)
    delta = torch.matmul(*alphaedit.solve(LayerProblem("m", 0, keys, residuals, statistics)))
    preserved = eigenvectors[:, expected_rank:]
    assert float((delta @ preserved).norm() / delta.norm()) < 1e-12
    with pytest.raises(ValueError, match="nullspace_energy"):
        get_algorithm("alphaedit", {"nullspace_energy": 1.5})


METHODS = {
    "memit_seq": {},
    "emmet": {"emmet_ridge": 0.0},
    # A light ridge (the tiny model has few keys) and the relative rules (the tiny model's activation scale is not a
    # real model's, so the published absolute threshold and ridge mean nothing there).
    "alphaedit": {
        "nullspace_threshold": 0.5,
        "nullspace_rule": "relative",
        "alphaedit_l2": 1e-3,
        "alphaedit_l2_relative": True,
    },
}


def sequential_arguments(method: str, cache_dir, **overrides):
    """`tiny_editing_arguments` for `method` with the settings of `METHODS` (and its lambda 1 for the methods that
    have a lambda)."""
    return tiny_editing_arguments(cache_dir, **{"algorithm": method, **METHODS[method], **overrides})


@pytest.mark.parametrize("method", sorted(METHODS))
def test_sequential_methods_edit_a_tiny_model(method, tokenizer, tmp_path):
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    args = sequential_arguments(method, tmp_path)
    editor = Editor(model, args=args, processing_class=tokenizer, stats_dataset=tiny_corpus())
    requests = subject_final_requests()
    first, second = requests[:2], requests[2:]
    editor.edit(first)
    output = editor.edit(second)
    assert all(d.rank <= len(second) for d in output.deltas)
    if method == "alphaedit":
        assert all(value >= 1 for key, value in output.metrics.items() if key.startswith("nullspace_rank/"))
        # The spectrum of each layer's statistics is cached beside them, and a new editor gets the same projector.
        spectra = sorted(tmp_path.glob("*.spectrum.safetensors"))
        assert len(spectra) == len(editor.resolved_args.layers)
        fresh = Editor(
            build_tiny_causal_lm("llama", vocab_size=len(tokenizer)),
            args=args,
            processing_class=tokenizer,
            stats_dataset=tiny_corpus(),
        )
        fresh.edit(first)
        for name in (delta.module_name for delta in output.deltas):
            projector, alpha = editor.algorithm.prepared(name)
            assert (
                torch.equal(fresh.algorithm.prepared(name)[0], projector)
                and fresh.algorithm.prepared(name)[1] == alpha
            )
    prompts = [r["prompt"].replace("{}", r["subject"]) for r in second]
    targets = [tokenizer(" " + r["target_new"], add_special_tokens=False)["input_ids"][0] for r in second]
    assert next_token_argmax(model, tokenizer, prompts) == targets


class RecordingAlphaEdit(AlphaEdit):
    """AlphaEdit that keeps every layer problem it solved (the keys and residuals the editor computed) and its float64
    factors."""

    def __init__(self, config=None):
        super().__init__(config)
        self.problems: list[tuple[LayerProblem, torch.Tensor]] = []

    def solve(self, problem):
        lora_B, lora_A = super().solve(problem)
        self.problems.append((problem, lora_B @ lora_A))
        return lora_B, lora_A


def test_published_alphaedit_on_a_tiny_model_is_the_reference_formula(tokenizer, tmp_path):
    """Two sequential batches on the tiny Llama with the published rules (absolute threshold, absolute ridge): every
    layer's update equals the reference's `solve(P (K K^T + cache_c) + L2 I, P K R^T)^T`, with `P` from the SVD of the
    layer's `C0`, `cache_c` the first batch's keys at that layer, and `K`, `R` the keys and residuals the editor
    computed (float64, 1e-12 against the update's size; the applied float32 factors to float32 rounding)."""
    probe = Editor(
        build_tiny_causal_lm("llama", vocab_size=len(tokenizer)),
        args=tiny_editing_arguments(tmp_path, algorithm="alphaedit"),
        processing_class=tokenizer,
        stats_dataset=tiny_corpus(),
    )
    statistics = probe.get_statistics(probe.resolved_args.layers)
    spectra = [torch.linalg.eigvalsh(s.covariance()) for s in statistics.values()]
    threshold = float(torch.cat(spectra).median())  # cuts a proper null space at every layer
    l2 = float(torch.cat(spectra).mean())
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    args = tiny_editing_arguments(
        tmp_path, algorithm="alphaedit", nullspace_threshold=threshold, alphaedit_l2=l2, v_num_grad_steps=5
    )
    editor = Editor(model, args=args, processing_class=tokenizer, stats_dataset=tiny_corpus())
    assert editor.resolved_args.method_config.effective_nullspace_rule == "absolute"
    recording = RecordingAlphaEdit(editor.resolved_args.method_config)
    editor.algorithm = recording
    requests = subject_final_requests()
    editor.edit(requests[:2])
    first = {problem.module_name: problem.keys for problem, _ in recording.problems}
    recording.problems.clear()
    output = editor.edit(requests[2:])
    deltas = {delta.module_name: delta for delta in output.deltas}
    for problem, solved in recording.problems:
        covariance = problem.statistics.covariance()
        U, S, _ = torch.linalg.svd(covariance, full_matrices=False)
        small = (S < threshold).nonzero(as_tuple=True)[0]
        assert 0 < len(small) < len(S)
        P = U[:, small] @ U[:, small].T
        layer_ks, resid = problem.keys.T, problem.residuals.T
        cache_c = first[problem.module_name].T @ first[problem.module_name]
        eye = torch.eye(layer_ks.shape[0], dtype=torch.float64)
        upd_matrix = torch.linalg.solve(P @ (layer_ks @ layer_ks.T + cache_c) + l2 * eye, P @ layer_ks @ resid.T)
        assert float((solved - upd_matrix.T).norm() / upd_matrix.norm()) < 1e-12, problem.module_name
        delta = deltas[problem.module_name]
        applied = delta.lora_B.double() @ delta.lora_A.double()
        assert float((applied - upd_matrix.T).norm() / upd_matrix.norm()) < 1e-6, problem.module_name


@pytest.mark.parametrize("method", ["memit", "memit_seq", "emmet", "alphaedit"])
def test_rollback_is_bit_exact_for_weights_and_state(method, tokenizer, tmp_path):
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    flat = {"algorithm": method, "v_num_grad_steps": 5}
    flat.update({"nullspace_threshold": 0.5, "nullspace_rule": "relative"} if method == "alphaedit" else {})
    editor = Editor(
        model, args=tiny_editing_arguments(tmp_path, **flat), processing_class=tokenizer, stats_dataset=tiny_corpus()
    )
    original = parameters_snapshot(model)
    requests = subject_final_requests()
    editor.edit(requests[:2])
    after_first = parameters_snapshot(model)
    state_after_first = {k: v.clone() for k, v in editor.algorithm.state_dict().items()}
    editor.edit(requests[2:3])
    editor.edit(requests[3:])
    assert changed_tensors(model, after_first) != []
    editor.rollback(2)
    assert changed_tensors(model, after_first) == [] and len(editor.history) == 1
    state = editor.algorithm.state_dict()
    assert state.keys() == state_after_first.keys() and all(torch.equal(state[k], state_after_first[k]) for k in state)
    if method != "memit":
        assert state  # the sequential methods hold a key Gram per layer
    editor.rollback()
    assert changed_tensors(model, original) == [] and editor.history == [] and editor.algorithm.state_dict() == {}
    with pytest.raises(ValueError, match=r"`k` must be between 1 and the number of edits held \(0\), got 1"):
        editor.rollback()


def edit_writes(delta, keys: torch.Tensor) -> torch.Tensor:
    """`(d_out, n)`: what an update adds to the edited module's output at each of `keys` `(n, d_in)`."""
    return delta.lora_B.double() @ (delta.lora_A.double() @ keys.T)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_second_batch_leaves_the_keys_of_the_first_in_place(method, tokenizer, tmp_path):
    """What makes a method sequential: at every edited layer, batch 2's update barely moves the outputs at batch 1's
    keys, which the method's accumulated key Gram holds, ||Delta_2 K_1|| / ||Delta_1 K_1|| (K_1: batch 1's keys as
    its edit used them, recomputed on the model after it). On the tiny Llama it is below 5e-3 (memit_seq, emmet) and
    1e-5 (alphaedit); solved without the Gram (a fresh editor's state) it is 0.1 to 0.35 at these layers."""
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    editor = Editor(
        model,
        args=sequential_arguments(method, tmp_path, v_num_grad_steps=10),
        processing_class=tokenizer,
        stats_dataset=tiny_corpus(),
    )
    requests = subject_final_requests()
    first = editor.edit(requests[:2])
    templates = editor.context_templates
    keys = [
        compute_keys_and_outputs(model, tokenizer, editor.layout, first.requests, templates, layer, 1)[0]
        for layer in (0, 1)
    ]
    state = editor.algorithm.state_dict()
    for layer_keys, delta in zip(keys, first.deltas):
        # The same operations on the same weights: the keys the state accumulated, bit for bit.
        assert torch.equal(state[f"{delta.module_name}::key_gram"], layer_keys.T @ layer_keys)
    second = editor.edit(requests[2:])
    for layer_keys, earlier, later in zip(keys, first.deltas, second.deltas):
        moved = float(edit_writes(later, layer_keys).norm() / edit_writes(earlier, layer_keys).norm())
        assert moved < 0.02, (later.module_name, moved)


class RaiseAtLayer(EditorCallback):
    """Fails an edit after the update of `layer` was solved (its key Gram staged) and applied."""

    def __init__(self, layer: int):
        self.layer = layer

    def on_layer_end(self, editor, layer, delta):
        if layer == self.layer:
            raise RuntimeError(f"callback failed at layer {layer}")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_failed_edit_leaves_the_state_of_a_sequential_method_unchanged(method, tokenizer, tmp_path):
    """An edit that fails after its last layer was solved leaves the weights and the method's state bit-identical to
    what they were, and the next edit adds its own key Gram alone to that state (nothing of the failed one)."""
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    editor = Editor(
        model,
        args=sequential_arguments(method, tmp_path, v_num_grad_steps=3),
        processing_class=tokenizer,
        stats_dataset=tiny_corpus(),
    )
    requests = subject_final_requests()
    editor.edit(requests[:2])
    weights = parameters_snapshot(model)
    state = {name: tensor.clone() for name, tensor in editor.algorithm.state_dict().items()}
    assert len(state) == 2
    editor.callbacks = [RaiseAtLayer(1)]
    with pytest.raises(RuntimeError, match="callback failed at layer 1"):
        editor.edit(requests[2:3])
    after = editor.algorithm.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[name], state[name]) for name in state)
    assert changed_tensors(model, weights) == [] and len(editor.history) == 1
    editor.callbacks = []
    output = editor.edit(requests[3:])
    expected = dict(state)
    for layer, delta in zip((0, 1), output.deltas):  # the keys of this edit, recomputed on the model after it
        keys, _ = compute_keys_and_outputs(
            model, tokenizer, editor.layout, output.requests, editor.context_templates, layer, 1
        )
        name = f"{delta.module_name}::key_gram"
        expected[name] = expected[name] + keys.T @ keys  # the operation of `commit`
    after = editor.algorithm.state_dict()
    assert after.keys() == expected.keys() and all(torch.equal(after[name], expected[name]) for name in expected)


def test_switching_the_method_while_state_is_held_is_refused(tokenizer, tmp_path):
    """`args` naming another method, or another configuration of the same one, while the method holds state from
    earlier edits: `Editor.algorithm` and `edit()` refuse (the weights unchanged) until `restore()` drops the state."""
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    args = sequential_arguments("memit_seq", tmp_path, v_num_grad_steps=3)
    editor = Editor(model, args=args, processing_class=tokenizer, stats_dataset=tiny_corpus())
    requests = subject_final_requests()
    editor.edit(requests[:2])
    held = editor.algorithm
    weights = parameters_snapshot(model)
    message = (
        r"`args` changed the method from `memit_seq` \{'mom2_update_weight': 1\.0, 'update_norm_weight': 0\.0\} while it "
        r"holds state from "
        r"earlier edits; call `restore\(\)` first\."
    )
    for other in (
        sequential_arguments("emmet", tmp_path, v_num_grad_steps=3),
        sequential_arguments("memit_seq", tmp_path, v_num_grad_steps=3, mom2_update_weight=2.0),
    ):
        editor.args = other
        with pytest.raises(ValueError, match=message):
            editor.algorithm  # noqa: B018
        with pytest.raises(ValueError, match=message):
            editor.edit(requests[2:])
        assert changed_tensors(model, weights) == [] and len(editor.history) == 1
    editor.args = args  # back to the held method: its state is still there
    assert editor.algorithm is held and held.state_dict()
    editor.restore()
    editor.args = sequential_arguments("emmet", tmp_path, v_num_grad_steps=3)
    assert editor.algorithm.name == "emmet" and editor.algorithm.state_dict() == {}
