"""Several CPU processes (gloo, via accelerate's debug_launcher): statistics split and summed, z optimisation sharded
by whole chunks and put back by index, both equal to one process's result."""

import os

import pytest
import torch
from accelerate import debug_launcher
from safetensors.torch import load_file, save_file

from memit_hf.distributed import process_state
from memit_hf.statistics import collect_second_moments, token_pieces
from tests.testing_utils import build_tiny_causal_lm, build_tiny_tokenizer, tiny_corpus


MODULES = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


def _moments():
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    pieces = token_pieces(tokenizer, tiny_corpus(), num_tokens=3000, max_length=32, seed=0)
    return collect_second_moments(model, tokenizer, MODULES, pieces, batch_tokens=128, show_progress=False)


def _fresh_state():
    """Forked workers inherit the parent's (single-process) state singleton: drop it so each sees the group. The
    new state sets torch's thread count for CPU processes (accelerate), so one thread is set again afterwards: the
    thread count changes the reduction order of matrix products, and with it the last bits of every result."""
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()
    state = process_state()
    assert state.num_processes == int(os.environ["MEMIT_TEST_PROCESSES"]), state
    torch.set_num_threads(1)
    return state


def _distributed_worker():
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
    monkeypatch.setenv("MEMIT_TEST_PROCESSES", "2")
    debug_launcher(_distributed_worker, num_processes=2)
    distributed = load_file(str(out))
    single = _moments()
    assert int(distributed["count"]) == next(iter(single.values())).count
    for name in MODULES:
        torch.testing.assert_close(distributed[name], single[name].total, rtol=1e-6, atol=1e-6)


def _edit(cache_dir, num_requests):
    from memit_hf.editor import Editor
    from tests.testing_utils import subject_final_requests, tiny_editing_arguments

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    args = tiny_editing_arguments(cache_dir, v_batch_size=2)
    editor = Editor(model, args=args, processing_class=tokenizer, stats_dataset=tiny_corpus())
    requests = (subject_final_requests() * 2)[:num_requests]  # chunks of 2 requests: uneven shares per process
    return editor.edit(requests)


def _distributed_edit_worker():
    _fresh_state()
    output = _edit(os.environ["MEMIT_TEST_CACHE"], int(os.environ["MEMIT_TEST_REQUESTS"]))
    tensors = {"targets": output.values.targets, "steps": output.values.steps}
    tensors.update({d.module_name: d.dense() for d in output.deltas})
    save_file(tensors, os.environ["MEMIT_TEST_OUT"] + f"-rank{process_state().process_index}")
    process_state().wait_for_everyone()


@pytest.mark.parametrize("num_processes, num_requests", [(2, 5), (3, 5), (4, 5), (3, 1), (4, 7)])
def test_processes_shard_the_z_optimisation_exactly(tmp_path, monkeypatch, num_processes, num_requests):
    """Each process optimises whole chunks of requests (some processes none); after the put-back every process holds
    every target value in request order, bit-identical to one process's (each chunk runs the same operations on the
    same inputs), and applies the same update. The statistics come from one shared cache, so the solves see the same
    second moments and the deltas are bit-identical too; collecting them on several processes is tested above."""
    single = _edit(tmp_path / "stats", num_requests)
    monkeypatch.setenv("MEMIT_TEST_OUT", str(tmp_path / "edit"))
    monkeypatch.setenv("MEMIT_TEST_CACHE", str(tmp_path / "stats"))
    monkeypatch.setenv("MEMIT_TEST_REQUESTS", str(num_requests))
    monkeypatch.setenv("MEMIT_TEST_PROCESSES", str(num_processes))
    debug_launcher(_distributed_edit_worker, num_processes=num_processes)
    ranks = [load_file(str(tmp_path / f"edit-rank{rank}")) for rank in range(num_processes)]
    for result in ranks:
        assert torch.equal(result["targets"], single.values.targets)
        assert torch.equal(result["steps"], single.values.steps)
        for delta in single.deltas:
            assert torch.equal(result[delta.module_name], delta.dense()), delta.module_name
