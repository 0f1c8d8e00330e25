"""The persisted editor state: save, continue in another process, refuse a foreign state, roll back across it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from memit_hf.editor import Editor
from memit_hf.editor_state import StateMismatchError, is_state_dir, read_state
from tests.testing_utils import (
    build_tiny_causal_lm,
    build_tiny_tokenizer,
    changed_tensors,
    parameters_snapshot,
    subject_final_requests,
    tiny_corpus,
    tiny_editing_arguments,
)


REPO = Path(__file__).resolve().parents[1]
FLAT = {"algorithm": "memit_seq", "mom2_update_weight": 1.0, "v_num_grad_steps": 8}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def make_editor(tokenizer, cache_dir, seed: int = 0, corpus=None, **flat) -> Editor:
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=seed)
    args = tiny_editing_arguments(cache_dir, **{**FLAT, **flat})
    return Editor(model, args=args, processing_class=tokenizer, stats_dataset=corpus or tiny_corpus())


CONTINUE_SCRIPT = """
import sys, torch
from safetensors.torch import save_file
from memit_hf.editor import Editor
from tests.testing_utils import build_tiny_causal_lm, build_tiny_tokenizer, subject_final_requests, tiny_corpus
torch.set_num_threads(1)
tokenizer = build_tiny_tokenizer()
model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
editor = Editor.from_state(model, sys.argv[1], processing_class=tokenizer, stats_dataset=tiny_corpus())
editor.edit(subject_final_requests()[2:])
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, sys.argv[2])
editor.save_state(sys.argv[3])
"""


def test_save_state_then_continue_in_a_new_process_equals_one_process(tokenizer, tmp_path):
    """Edit batch 1, save, continue with batch 2 in a fresh interpreter: the weights equal those of editing both
    batches in this process, and so does the accumulated key Gram."""
    torch.set_num_threads(1)
    requests = subject_final_requests()
    editor = make_editor(tokenizer, tmp_path / "stats")
    editor.edit(requests[:2])
    editor.save_state(tmp_path / "state")
    assert is_state_dir(tmp_path / "state")
    editor.edit(requests[2:])
    expected = editor.model.state_dict()

    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    paths = [str(tmp_path / "state"), str(tmp_path / "weights.safetensors"), str(tmp_path / "state2")]
    result = subprocess.run([sys.executable, "-c", CONTINUE_SCRIPT, *paths], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    continued = load_file(paths[1])
    for name, tensor in expected.items():
        error = float((continued[name] - tensor).norm() / tensor.norm().clamp_min(1e-30))
        assert error < 1e-6, name
    fresh = build_tiny_causal_lm("llama", vocab_size=len(tokenizer)).state_dict()
    assert any(not torch.equal(continued[name], fresh[name]) for name in fresh)  # the edits are in
    state = read_state(paths[2])
    assert [len(batch.requests) for batch in state.batches] == [2, 2]
    ours = editor.algorithm.state_dict()
    assert state.algorithm_state.keys() == ours.keys()
    for name, gram in ours.items():
        assert float((state.algorithm_state[name] - gram).norm() / gram.norm()) < 1e-6


def test_state_folder_holds_the_adapters_and_round_trips(tokenizer, tmp_path):
    from peft import PeftModel

    requests = subject_final_requests()
    editor = make_editor(tokenizer, tmp_path / "stats")
    editor.edit(requests[:2])
    editor.edit(requests[2:3])
    editor.save_state(tmp_path / "state")
    folder = tmp_path / "state"
    metadata = json.loads((folder / "memit_edits.json").read_text())
    assert [batch["num_requests"] for batch in metadata["batches"]] == [2, 1]
    card = (folder / "README.md").read_text()
    assert "| 0 | memit_seq | 2 |" in card and "| 1 | memit_seq | 1 |" in card
    for i, size in enumerate([2, 1]):
        one = json.loads((folder / "batches" / f"{i:04d}" / "memit_edits.json").read_text())
        assert [batch["num_requests"] for batch in one["batches"]] == [size]

    # The top-level adapter reproduces the edited model; each batch adapter its own update.
    edited = parameters_snapshot(editor.model)
    base = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    merged = PeftModel.from_pretrained(base, str(folder)).merge_and_unload()
    for name in edited:
        if "down_proj" in name:
            assert torch.allclose(merged.state_dict()[name], edited[name], atol=1e-6), name

    state = read_state(folder)
    assert state.algorithm == "memit_seq" and state.num_edits == 3
    assert state.context_templates == editor.context_templates
    for saved, output in zip(state.batches, editor.history):
        for a, b in zip(saved.deltas, output.deltas):
            assert (
                a.module_name == b.module_name and torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B)
            )
        for (m1, k1, f1), (m2, k2, f2) in zip(saved.increments, output.state_increments):
            assert (m1, k1) == (m2, k2) and torch.equal(f1, f2)
    for name, tensor in editor.algorithm.state_dict().items():
        assert torch.equal(state.algorithm_state[name], tensor)


def test_rollback_after_from_state_is_bit_exact(tokenizer, tmp_path):
    requests = subject_final_requests()
    editor = make_editor(tokenizer, tmp_path / "stats")
    original = parameters_snapshot(editor.model)
    editor.edit(requests[:2])
    after_first = parameters_snapshot(editor.model)
    gram_after_first = {k: v.clone() for k, v in editor.algorithm.state_dict().items()}
    editor.edit(requests[2:])
    editor.save_state(tmp_path / "state", save_adapters=False)
    assert not (tmp_path / "state" / "adapter_config.json").exists()

    fresh = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    continued = Editor.from_state(fresh, tmp_path / "state", processing_class=tokenizer, stats_dataset=tiny_corpus())
    assert changed_tensors(fresh, parameters_snapshot(editor.model)) == []  # re-applied bit for bit
    assert len(continued.history) == 2
    continued.rollback()
    assert changed_tensors(fresh, after_first) == []
    state = continued.algorithm.state_dict()
    assert state.keys() == gram_after_first.keys() and all(torch.equal(state[k], gram_after_first[k]) for k in state)
    continued.restore()
    assert changed_tensors(fresh, original) == []


def test_a_state_for_another_model_is_refused(tokenizer, tmp_path):
    editor = make_editor(tokenizer, tmp_path / "stats")
    editor.edit(subject_final_requests()[:2])
    editor.save_state(tmp_path / "state")
    kwargs = dict(processing_class=tokenizer, stats_dataset=tiny_corpus())

    other = build_tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=1)
    snapshot = parameters_snapshot(other)
    with pytest.raises(StateMismatchError, match="was made for another model.*embedding_digest"):
        Editor.from_state(other, tmp_path / "state", **kwargs)
    assert changed_tensors(other, snapshot) == []

    # The right architecture and embeddings, but the edits already merged in: refused, not applied twice.
    merged = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    merged.load_state_dict(editor.model.state_dict())
    with pytest.raises(StateMismatchError, match=r"weight of `model\.layers\.\d\.mlp\.down_proj` differs"):
        Editor.from_state(merged, tmp_path / "state", **kwargs)

    base = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    with pytest.raises(StateMismatchError, match="statistics of `model.layers.0.mlp.down_proj`"):
        Editor.from_state(base, tmp_path / "state", processing_class=tokenizer, stats_dataset=tiny_corpus()[:20])
    with pytest.raises(StateMismatchError, match="holds `memit_seq`.*but `args` say `memit`"):
        Editor.from_state(base, tmp_path / "state", args=tiny_editing_arguments(tmp_path / "stats"), **kwargs)
    with pytest.raises(FileNotFoundError, match="No editor state"):
        Editor.from_state(base, tmp_path / "nothing", **kwargs)


def test_a_stateful_method_refuses_new_statistics_mid_sequence(tokenizer, tmp_path):
    editor = make_editor(tokenizer, tmp_path / "stats")
    editor.edit(subject_final_requests()[:2])
    weights = parameters_snapshot(editor.model)
    editor.stats_dataset = tiny_corpus()[:20]
    editor.args.stats_num_tokens = 5000  # a new provider, other statistics
    with pytest.raises(StateMismatchError, match="holds state accumulated with the statistics"):
        editor.edit(subject_final_requests()[2:])
    assert changed_tensors(editor.model, weights) == []
