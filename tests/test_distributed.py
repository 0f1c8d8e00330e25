"""Two CPU processes (gloo, via accelerate's debug_launcher): statistics split and summed, z optimisation sharded and
gathered, both equal to one process's result."""

import os

import torch
from accelerate import debug_launcher
from safetensors.torch import load_file, save_file

from memit_hf.covariance import collect_second_moments, token_pieces
from memit_hf.distributed import process_state
from tests.testing_utils import build_tiny_causal_lm, build_tiny_tokenizer, tiny_corpus


MODULES = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


def _moments():
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    pieces = token_pieces(tokenizer, tiny_corpus(), num_tokens=3000, max_length=32, seed=0)
    return collect_second_moments(model, tokenizer, MODULES, pieces, batch_tokens=128, show_progress=False)


def _fresh_state():
    """Forked workers inherit the parent's (single-process) state singleton: drop it so each sees the group."""
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()
    state = process_state()
    assert state.num_processes == 2, state
    return state


def _distributed_worker():
    torch.set_num_threads(1)
    _fresh_state()
    moments = _moments()
    state = process_state()
    if state.is_main_process:
        tensors = {name: m.total for name, m in moments.items()}
        tensors["count"] = torch.tensor([next(iter(moments.values())).count])
        save_file(tensors, os.environ["MEMIT_TEST_OUT"])
    state.wait_for_everyone()


def test_two_processes_match_one(tmp_path, monkeypatch):
    out = tmp_path / "moments.safetensors"
    monkeypatch.setenv("MEMIT_TEST_OUT", str(out))
    debug_launcher(_distributed_worker, num_processes=2)
    distributed = load_file(str(out))
    single = _moments()
    assert int(distributed["count"]) == next(iter(single.values())).count
    for name in MODULES:
        torch.testing.assert_close(distributed[name], single[name].total, rtol=1e-6, atol=1e-6)


def _edit(cache_dir):
    from memit_hf.editor import Editor
    from tests.testing_utils import subject_final_requests, tiny_editing_arguments

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    args = tiny_editing_arguments(cache_dir, v_batch_size=2)
    editor = Editor(model, args=args, processing_class=tokenizer, stats_dataset=tiny_corpus())
    requests = subject_final_requests() + subject_final_requests()[:1]  # 5 requests: shards of 3 and 2 (+1 padding)
    return editor.edit(requests)


def _distributed_edit_worker():
    torch.set_num_threads(1)
    _fresh_state()
    output = _edit(os.environ["MEMIT_TEST_CACHE"] + f"-rank{process_state().process_index}")
    tensors = {"targets": output.values.targets, "steps": output.values.steps}
    tensors.update({d.module_name: d.dense() for d in output.deltas})
    save_file(tensors, os.environ["MEMIT_TEST_OUT"] + f"-rank{process_state().process_index}")
    process_state().wait_for_everyone()


def test_two_processes_shard_the_z_optimisation(tmp_path, monkeypatch):
    """Each process optimises part of the requests; after the gather both hold every target value, in order, equal to
    one process's to float tolerance, and both apply the same update."""
    monkeypatch.setenv("MEMIT_TEST_OUT", str(tmp_path / "edit"))
    monkeypatch.setenv("MEMIT_TEST_CACHE", str(tmp_path / "stats"))
    debug_launcher(_distributed_edit_worker, num_processes=2)
    ranks = [load_file(str(tmp_path / f"edit-rank{rank}")) for rank in (0, 1)]
    single = _edit(tmp_path / "single-stats")
    for result in ranks:
        assert result["targets"].shape == single.values.targets.shape
        torch.testing.assert_close(result["targets"], single.values.targets, rtol=1e-4, atol=1e-4)
        assert torch.equal(result["steps"], single.values.steps)
        for delta in single.deltas:
            expected = delta.dense()
            assert float((result[delta.module_name] - expected).norm() / expected.norm()) < 1e-4
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name  # every process holds the same edit
