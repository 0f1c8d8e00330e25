"""Tests of `memit_hf.models`: the one model loader, and the tokenizer found from a loaded model as `pipeline` does."""

import pytest

from memit_hf import Editor
from memit_hf.models import load_model_and_tokenizer, load_tokenizer_for
from tests.testing_utils import (
    build_tiny_causal_lm,
    build_tiny_tokenizer,
    next_token_argmax,
    subject_final_requests,
    tiny_corpus,
    tiny_editing_arguments,
)


@pytest.fixture
def saved(tmp_path):
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    return tmp_path / "model", tokenizer


def test_loader_reads_a_folder(saved):
    path, tokenizer = saved
    model, loaded = load_model_and_tokenizer(path)
    assert not model.training and model.config._name_or_path == str(path)
    assert loaded("The city of Rome")["input_ids"] == tokenizer("The city of Rome")["input_ids"]


def test_editor_finds_the_tokenizer_of_a_model_instance(saved, tmp_path):
    """`Editor(model).edit(requests)` with a model loaded from a local folder and no tokenizer: the tokenizer comes
    from the model's `name_or_path`, and the edit works (each target's first token becomes the argmax)."""
    path, tokenizer = saved
    model, _ = load_model_and_tokenizer(path)
    editor = Editor(model, args=tiny_editing_arguments(tmp_path / "stats"), stats_dataset=tiny_corpus())
    assert editor.tokenizer("Therefore Lionel Messi")["input_ids"] == tokenizer("Therefore Lionel Messi")["input_ids"]
    requests = subject_final_requests()
    editor.edit(requests)
    prompts = [r["prompt"].replace("{}", r["subject"]) for r in requests]
    targets = [tokenizer(" " + r["target_new"], add_special_tokens=False)["input_ids"][0] for r in requests]
    assert next_token_argmax(model, tokenizer, prompts) == targets


def test_missing_tokenizer_error_names_what_to_pass(saved, tmp_path):
    path, _ = saved
    model, _ = load_model_and_tokenizer(path)
    (path / "tokenizer.json").unlink()
    (path / "tokenizer_config.json").unlink()
    with pytest.raises(ValueError, match=r"loading it from `.*model` failed .* Pass it as `Editor\(model, "):
        load_tokenizer_for(model)
    nameless = build_tiny_causal_lm("llama", vocab_size=len(build_tiny_tokenizer()))
    with pytest.raises(ValueError, match=r"the model records no `name_or_path`\. Pass it as"):
        Editor(nameless, args=tiny_editing_arguments(tmp_path / "stats"))


def test_the_tokenizer_is_loaded_with_the_models_location_kwargs(tmp_path):
    """Point 10 of the trust issue: `model_init_kwargs` such as `subfolder`, `revision` or `token` say where the
    tokenizer comes from too (before, the tokenizer was loaded from the bare path and failed here)."""
    tokenizer = build_tiny_tokenizer()
    build_tiny_causal_lm("llama", vocab_size=len(tokenizer)).save_pretrained(tmp_path / "repo" / "sub")
    tokenizer.save_pretrained(tmp_path / "repo" / "sub")
    model, loaded = load_model_and_tokenizer(tmp_path / "repo", {"subfolder": "sub", "revision": "main"})
    assert loaded("The city of Rome")["input_ids"] == tokenizer("The city of Rome")["input_ids"]
    assert model.config.vocab_size == len(tokenizer)
