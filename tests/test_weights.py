"""Editing a model dispatched by accelerate over the CPU and disk (`device_map` with offload): the edit lands in the
real weights, equals the edit of the same model undispatched, and `restore()` is exact; the checkpoint on disk is
never written."""

import hashlib
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from memit_hf.editor import Editor
from memit_hf.weights import offload_map, read_parameter, write_parameter
from tests.testing_utils import (
    build_tiny_causal_lm,
    build_tiny_tokenizer,
    subject_final_requests,
    tiny_corpus,
    tiny_editing_arguments,
)


DEVICE_MAP = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.layers.2": "disk",
    "model.norm": "cpu",
    "lm_head": "cpu",
}
EDITED = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def checkpoint(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("checkpoint")
    build_tiny_causal_lm("llama", vocab_size=len(tokenizer)).save_pretrained(path)
    return path


def file_digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def dispatched(checkpoint, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(checkpoint, device_map=DEVICE_MAP, offload_folder=tmp_path / "off")
    return model.eval()


def test_read_and_write_an_offloaded_weight(checkpoint, tmp_path):
    model = dispatched(checkpoint, tmp_path)
    module = model.get_submodule(EDITED[1])
    assert module.weight.device.type == "meta" and offload_map(module) is not None  # really on disk
    plain = AutoModelForCausalLM.from_pretrained(checkpoint)
    expected = plain.get_submodule(EDITED[1]).weight
    assert torch.equal(read_parameter(module), expected)
    on_disk = file_digest(checkpoint / "model.safetensors")
    write_parameter(module, expected * 2)
    assert torch.equal(read_parameter(module), expected * 2) and module.weight.device.type == "meta"
    with torch.no_grad():
        ids = torch.tensor([[5, 6, 7, 8]])
        plain.get_submodule(EDITED[1]).weight.mul_(2)
        torch.testing.assert_close(model(ids).logits, plain(ids).logits, rtol=0, atol=0)  # the forward uses it
    assert file_digest(checkpoint / "model.safetensors") == on_disk
    kept = plain.get_submodule(EDITED[0])
    assert offload_map(kept) is None and read_parameter(kept) is kept.weight


def test_edit_of_an_offloaded_model_equals_the_plain_edit_and_restores_exactly(checkpoint, tokenizer, tmp_path):
    requests = subject_final_requests()
    plain = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    Editor(
        plain, args=tiny_editing_arguments(tmp_path / "stats"), processing_class=tokenizer, stats_dataset=tiny_corpus()
    ).edit(requests)

    model = dispatched(checkpoint, tmp_path)
    original = {name: read_parameter(model.get_submodule(name)).clone() for name in EDITED}
    on_disk = file_digest(checkpoint / "model.safetensors")
    editor = Editor(
        model,
        args=tiny_editing_arguments(tmp_path / "stats2"),
        processing_class=tokenizer,
        stats_dataset=tiny_corpus(),
    )
    output = editor.edit(requests)
    assert [delta.module_name for delta in output.deltas] == EDITED
    for name in EDITED:
        edited = read_parameter(model.get_submodule(name)).detach()
        expected = plain.get_submodule(name).weight.detach()
        assert not torch.equal(edited, original[name])
        assert float((edited - expected).norm() / expected.norm()) < 1e-6, name
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert float((model(ids).logits - plain(ids).logits).abs().max()) < 1e-5
    editor.restore()
    assert all(torch.equal(read_parameter(model.get_submodule(name)), original[name]) for name in EDITED)
    assert file_digest(checkpoint / "model.safetensors") == on_disk
    assert json.loads((checkpoint / "config.json").read_text())["model_type"] == "llama"
