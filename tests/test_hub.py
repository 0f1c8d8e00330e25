"""Tests of `memit_hf.hub` and `Editor.push_to_hub` without network: `HfApi.create_repo` / `upload_folder` are
replaced by fakes that record the call and copy the uploaded folder, which must hold exactly the adapter (or merged
checkpoint), the card and the metadata, and load back with `from_pretrained`."""

import copy
import json
import shutil
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from huggingface_hub import HfApi
from peft import PeftModel
from transformers import AutoModelForCausalLM

from memit_hf.editor import Editor
from memit_hf.hub import MAX_CARD_ROWS, build_model_card, push_folder
from tests.testing_utils import (
    build_tiny_causal_lm,
    build_tiny_tokenizer,
    subject_final_requests,
    tiny_corpus,
    tiny_editing_arguments,
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


class FakeHub:
    """Records `create_repo` and `upload_folder` calls and keeps a copy of each uploaded folder."""

    def __init__(self, directory):
        self.directory = directory
        self.created, self.uploads = [], []

    def create_repo(self, api, repo_id, private=None, exist_ok=False, repo_type=None, **kwargs):
        self.created.append({"repo_id": repo_id, "private": private, "exist_ok": exist_ok, "token": api.token})
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, api, folder_path, repo_id, commit_message=None, revision=None, **kwargs):
        copy_path = self.directory / f"upload{len(self.uploads)}"
        shutil.copytree(folder_path, copy_path)
        self.uploads.append({"repo_id": repo_id, "commit_message": commit_message, "revision": revision,
                             "files": sorted(p.name for p in copy_path.iterdir()), "path": copy_path})  # fmt: skip
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0", oid="0")


@pytest.fixture
def fake_hub(tmp_path):
    hub = FakeHub(tmp_path / "hub")
    hub.directory.mkdir()
    with (
        mock.patch.object(HfApi, "create_repo", autospec=True, side_effect=hub.create_repo),
        mock.patch.object(HfApi, "upload_folder", autospec=True, side_effect=hub.upload_folder),
    ):
        yield hub


@pytest.fixture(scope="module")
def edited(tokenizer, tmp_path_factory):
    directory = tmp_path_factory.mktemp("hub")
    base = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    base.save_pretrained(directory / "base")
    model = copy.deepcopy(base)
    args = tiny_editing_arguments(directory / "stats", hub_model_id="me/tiny-edits", hub_private_repo=True,
                                  hub_token="hf_secret")  # fmt: skip
    editor = Editor(model, args=args, processing_class=tokenizer, stats_dataset=tiny_corpus())
    editor.edit(subject_final_requests())
    return SimpleNamespace(base=base, base_dir=directory / "base", model=model, editor=editor)


def logits(model, tokenizer):
    with torch.no_grad():
        return model(**tokenizer(["The city of the Eiffel Tower"], return_tensors="pt")).logits


def test_push_adapter_uses_the_hub_arguments(edited, fake_hub, tokenizer):
    result = edited.editor.push_to_hub(base_model_name_or_path=str(edited.base_dir))
    assert result.commit_url.startswith("https://huggingface.co/me/tiny-edits")
    assert fake_hub.created == [{"repo_id": "me/tiny-edits", "private": True, "exist_ok": True, "token": "hf_secret"}]
    (upload,) = fake_hub.uploads
    assert upload["repo_id"] == "me/tiny-edits" and upload["commit_message"] == "Add 4 fact edits (adapter)"
    assert upload["files"] == ["README.md", "adapter_config.json", "adapter_model.safetensors", "memit_edits.json"]
    folder = upload["path"]
    card = (folder / "README.md").read_text()
    assert "library_name: peft" in card and 'PeftModel.from_pretrained(base, "me/tiny-edits")' in card
    assert "hf_secret" not in (folder / "memit_edits.json").read_text() + card
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(edited.base_dir)
    # the uploaded folder loads back, with peft and with transformers alone
    peft_model = PeftModel.from_pretrained(copy.deepcopy(edited.base), folder)
    assert (logits(peft_model, tokenizer) - logits(edited.model, tokenizer)).abs().max() <= 1e-5
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert (logits(loaded.eval(), tokenizer) - logits(edited.model, tokenizer)).abs().max() <= 1e-5


def test_push_merged_model(edited, fake_hub, tokenizer):
    edited.editor.push_to_hub("me/merged", merged=True, private=False, token="hf_other", commit_message="edits")
    assert fake_hub.created[0]["private"] is False and fake_hub.created[0]["token"] == "hf_other"
    (upload,) = fake_hub.uploads
    assert upload["commit_message"] == "edits"
    assert {"README.md", "config.json", "model.safetensors", "memit_edits.json", "tokenizer.json"} <= set(
        upload["files"]
    )
    assert not any(name.startswith("adapter") for name in upload["files"])
    loaded = AutoModelForCausalLM.from_pretrained(upload["path"]).eval()
    assert (logits(loaded, tokenizer) - logits(edited.model, tokenizer)).abs().max() <= 1e-5
    assert "library_name: transformers" in (upload["path"] / "README.md").read_text()


def test_push_needs_a_repository(tokenizer, tmp_path, fake_hub):
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    editor = Editor(model, args=tiny_editing_arguments(tmp_path), processing_class=tokenizer,
                    stats_dataset=tiny_corpus())  # fmt: skip
    with pytest.raises(ValueError, match="hub_model_id"):
        editor.push_to_hub()
    with pytest.raises(FileNotFoundError):
        push_folder(tmp_path / "missing", "me/x")
    assert fake_hub.created == [] and fake_hub.uploads == []


def test_model_card_lists_edits_and_truncates():
    requests = [
        {"prompt": "{} is in", "subject": f"S|{i}", "target_new": f"new{i}", "target_true": "old", "case_id": i}
        for i in range(MAX_CARD_ROWS + 5)
    ]
    metadata = {
        "base_model_name_or_path": "org/base",
        "memit_hf_version": "0.1",
        "num_edits": len(requests),
        "batches": [{"algorithm": "rome", "num_requests": len(requests), "requests": requests,
                     "hyperparameters": {"layers": [5], "algorithm_config": {}},
                     "statistics": {"m": {"corpus": "texts:abc", "num_tokens": 1000}},
                     "metrics": {"efficacy_success": 99.0, "paraphrase_success": 90.0,
                                 "neighborhood_success": 70.0, "score": 84.0}}],
        "export": {"max_reconstruction_error": 0.0, "ranks": {"m": 105}, "adapter_bytes": 2_000_000},
    }  # fmt: skip
    card = build_model_card(metadata, "org/edits")
    assert "| 0 | S\\|0 | _S\\|0_ is in | new0 | old |" in card  # pipes escaped
    assert f"| {MAX_CARD_ROWS - 1} |" in card and f"| {MAX_CARD_ROWS} |" not in card
    assert "and 5 more edits" in card and "[ROME](https://huggingface.co/papers/2202.05262)" in card
    assert "| 0 | rome | 105 | [5] | - | texts:abc, 1000 tokens |" in card
    assert "| 0 | 99.0 | 90.0 | 70.0 | 84.0 |" in card and "exactly" in card
    assert "base_model:adapter:org/base" in card
