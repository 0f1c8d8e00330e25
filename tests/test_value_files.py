"""Target values on disk (`memit_hf.value_files`): a saved `ValueResult` reads back bit-identical and edits exactly
as the one computed; files that are not values files are refused."""

import pytest
import torch
from safetensors.torch import save_file

from memit_hf.editor import Editor
from memit_hf.value_files import load_values, load_values_metadata, save_values
from memit_hf.values import PER_REQUEST_FIELDS
from tests.testing_utils import (
    build_tiny_causal_lm,
    build_tiny_tokenizer,
    subject_final_requests,
    tiny_corpus,
    tiny_editing_arguments,
)


def test_saved_values_read_back_exactly_and_edit_the_same(tmp_path):
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    requests = subject_final_requests()
    editor = Editor(
        model, args=tiny_editing_arguments(tmp_path), processing_class=tokenizer, stats_dataset=tiny_corpus()
    )
    values = editor.compute_values(requests)
    path = tmp_path / "values" / "z.safetensors"
    save_values(values, path, metadata={"requests": len(requests), "note": "tiny"})
    loaded = load_values(path)
    for name in PER_REQUEST_FIELDS:
        assert torch.equal(getattr(loaded, name), getattr(values, name)), name
    assert loaded.schedule == values.schedule and loaded.chunks == values.chunks
    assert loaded.z_layer == values.z_layer == editor.resolved_args.layers[-1]
    assert loaded.value_norm_ratio is None
    assert load_values_metadata(path) == {"requests": len(requests), "note": "tiny"}
    assert not path.with_name(path.name + ".partial").exists()

    first = editor.edit(requests, values=values)
    editor.restore()
    second = editor.edit(requests, values=loaded)
    for a, b in zip(first.deltas, second.deltas, strict=True):
        assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B)


def test_files_that_are_not_values_files_are_refused(tmp_path):
    other = tmp_path / "weights.safetensors"
    save_file({"weight": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="not a memit-hf values file"):
        load_values(other)
    wrong = tmp_path / "future.safetensors"
    save_file({"targets": torch.zeros(1, 2)}, str(wrong), metadata={"memit_hf": '{"format": "memit_hf.values/99"}'})
    with pytest.raises(ValueError, match="memit_hf.values/99"):
        load_values(wrong)
