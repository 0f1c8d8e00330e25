"""Statistics collected by two CPU processes (gloo, via accelerate's debug_launcher) equal one process's."""

import os

import torch
from accelerate import PartialState, debug_launcher
from safetensors.torch import load_file, save_file

from memit_hf.covariance import collect_second_moments, token_pieces
from tests.testing_utils import build_tiny_causal_lm, build_tiny_tokenizer, tiny_corpus


MODULES = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


def _moments():
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    pieces = token_pieces(tokenizer, tiny_corpus(), num_tokens=3000, max_length=32, seed=0)
    return collect_second_moments(model, tokenizer, MODULES, pieces, batch_tokens=128, show_progress=False)


def _distributed_worker():
    torch.set_num_threads(1)
    moments = _moments()
    state = PartialState()
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
