"""Tests of `memit_hf.hub` and `Editor.push_to_hub` without network: `HfApi.create_repo` / `upload_folder` are
replaced by fakes that record the call and copy the uploaded folder, which must hold exactly the adapter (or merged
checkpoint), the card and the metadata, and load back with `from_pretrained`."""

import copy
import errno
import json
import logging
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from huggingface_hub import HfApi
from peft import PeftModel
from transformers import AutoModelForCausalLM

from memit_hf.deltas import LayerDelta
from memit_hf.editor import Editor
from memit_hf.export import STAGING_PREFIX, read_edits_metadata, save_adapter_files
from memit_hf.hub import MAX_CARD_ROWS, build_model_card, hide_local_paths, is_local_path, push_folder
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
        self.uploads.append(
            {
                "repo_id": repo_id,
                "commit_message": commit_message,
                "revision": revision,
                "files": sorted(p.name for p in copy_path.iterdir()),
                "path": copy_path,
            }
        )
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
    args = tiny_editing_arguments(
        directory / "stats", hub_model_id="me/tiny-edits", hub_private_repo=True, hub_token="hf_secret"
    )
    editor = Editor(model, args=args, processing_class=tokenizer, stats_dataset=tiny_corpus())
    editor.edit(subject_final_requests())
    return SimpleNamespace(base=base, base_dir=directory / "base", model=model, editor=editor)


def logits(model, tokenizer):
    with torch.no_grad():
        return model(**tokenizer(["The city of the Eiffel Tower"], return_tensors="pt")).logits


def test_push_adapter_uses_the_hub_arguments(edited, fake_hub, tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="memit_hf"):
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
    # The base was given as a local path: nothing published names it (it would mean nothing on the Hub), and the
    # user is told to name a Hub id.
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] is None
    assert json.loads((folder / "memit_edits.json").read_text())["base_model_name_or_path"] is None
    pushed = "".join((folder / name).read_text() for name in ("adapter_config.json", "memit_edits.json", "README.md"))
    assert str(edited.base_dir) not in pushed and "base_model:" not in card.split("---")[1]
    assert [r.getMessage() for r in caplog.records if "local path" in r.getMessage()] == [
        f"The base model is the local path {edited.base_dir}, which means nothing on the Hub: what is published names "
        "no base model (`base_model_name_or_path` is null in adapter_config.json and memit_edits.json, the model card "
        'has no `base_model`). Pass `base_model_name_or_path="<hub id>"` to name it.'
    ]
    # the uploaded folder loads back on the base model, with peft and with transformers alone
    peft_model = PeftModel.from_pretrained(copy.deepcopy(edited.base), folder)
    assert (logits(peft_model, tokenizer) - logits(edited.model, tokenizer)).abs().max() <= 1e-5
    loaded = copy.deepcopy(edited.base)
    loaded.load_adapter(str(folder))
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
    editor = Editor(
        model, args=tiny_editing_arguments(tmp_path), processing_class=tokenizer, stats_dataset=tiny_corpus()
    )
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
        "batches": [
            {
                "algorithm": "rome",
                "num_requests": len(requests),
                "requests": requests,
                "hyperparameters": {"layers": [5], "algorithm_config": {}},
                "statistics": {"m": {"corpus": "texts:abc", "num_tokens": 1000}},
                "metrics": {
                    "efficacy_success": 99.0,
                    "paraphrase_success": 90.0,
                    "neighborhood_success": 70.0,
                    "score": 84.0,
                },
            }
        ],
        "export": {"max_reconstruction_error": 0.0, "ranks": {"m": 105}, "adapter_bytes": 2_000_000},
    }
    card = build_model_card(metadata, "org/edits")
    assert "| 0 | S\\|0 | _S\\|0_ is in | new0 | old |" in card  # pipes escaped
    assert f"| {MAX_CARD_ROWS - 1} |" in card and f"| {MAX_CARD_ROWS} |" not in card
    assert "and 5 more edits" in card and "[ROME](https://huggingface.co/papers/2202.05262)" in card
    assert "| 0 | rome | 105 | [5] | - | texts:abc, 1000 tokens |" in card
    assert "| 0 | 99.0 | 90.0 | 70.0 | 84.0 |" in card and "exactly" in card
    assert "base_model:adapter:org/base" in card


def test_hide_local_paths():
    assert hide_local_paths("stats_repo:/home/me/stats") == "stats_repo:stats"
    assert hide_local_paths("wiki.txt, /data/corpora/news.txt (2 files)") == "wiki.txt, news.txt (2 files)"
    assert hide_local_paths("~/models/llama/ and C:\\Users\\me\\x.txt") == "llama and x.txt"
    for kept in ("https://huggingface.co/papers/2210.07229", "stats_repo:me/stats", "tokens:ab12", "1/2 of it"):
        assert hide_local_paths(kept) == kept
    assert is_local_path("/models/llama") and is_local_path("./llama") and is_local_path("~/llama")
    assert not is_local_path("org/llama") and not is_local_path("llama") and not is_local_path(None)


def test_model_card_prints_no_local_path():
    """A base model loaded from a folder and file paths in the statistics' corpus description: the card names the
    folder and the files, never their paths, and its YAML names no base model."""
    metadata = {
        "base_model_name_or_path": "/home/me/models/my-llama",
        "batches": [
            {
                "algorithm": "memit",
                "num_requests": 1,
                "requests": [],
                "hyperparameters": {"layers": [1], "algorithm_config": {"cache": "/home/me/cache"}},
                "statistics": {"m": {"corpus": "stats_repo:/home/me/stats", "num_tokens": 10}},
            }
        ],
    }
    card = build_model_card(metadata, "me/edits")
    assert "/home/me" not in card
    assert "`my-llama`" in card and "| stats_repo:stats, 10 tokens |" in card and "cache=cache" in card
    assert "base_model" not in card.split("---")[1] and "<base model id>" in card


class Uploads:
    """`HfApi.create_repo` / `upload_folder` fakes that record what each upload held (files and bytes)."""

    def __init__(self):
        self.calls = []

    def create_repo(self, api, repo_id, **kwargs):
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, api, folder_path, repo_id, **kwargs):
        root = Path(folder_path)
        files = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
        self.calls.append({"folder": root, "files": files})
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0")


@pytest.fixture
def uploads():
    fake = Uploads()
    with (
        mock.patch.object(HfApi, "create_repo", autospec=True, side_effect=fake.create_repo),
        mock.patch.object(HfApi, "upload_folder", autospec=True, side_effect=fake.upload_folder),
    ):
        yield fake


def adapter_folder(path, base):
    """An adapter folder as `save_adapter` writes it, plus what a user's folder may also hold."""
    deltas = [LayerDelta("model.layers.0.mlp.down_proj", torch.ones(8, 1), torch.ones(1, 4), False)]
    metadata = {"base_model_name_or_path": base, "batches": [], "num_edits": 1}
    report = save_adapter_files(deltas, path, base, None, None, metadata, repo_id="me/edits")
    (path / ".env").write_text("HF_TOKEN=hf_leaked\n")
    (path / "stale.bin").write_bytes(b"an older run")
    (path / "notes").mkdir()
    (path / "notes" / "todo.txt").write_text("private")
    return report


def test_push_folder_uploads_exactly_the_exported_files(tmp_path, uploads):
    """By default the files the export lists in `memit_edits.json`; with `files=`, exactly those; never the rest of
    the folder. The staging folder is made inside the folder and removed."""
    report = adapter_folder(tmp_path / "out", "org/base")
    push_folder(tmp_path / "out", "me/edits")
    (call,) = uploads.calls
    assert sorted(call["files"]) == sorted(report.files) == sorted(read_edits_metadata(tmp_path / "out")["files"])
    assert call["folder"].parent == tmp_path / "out" and call["folder"].name.startswith(STAGING_PREFIX)
    assert not call["folder"].exists()
    for name in ("adapter_model.safetensors", "README.md", "adapter_config.json"):
        assert call["files"][name] == (tmp_path / "out" / name).read_bytes(), name  # a Hub id: nothing to rewrite
    pushed = json.loads(call["files"]["memit_edits.json"])
    assert pushed["export"]["path"] == "out" and pushed == {
        **read_edits_metadata(tmp_path / "out"),
        "export": {**read_edits_metadata(tmp_path / "out")["export"], "path": "out"},
    }  # the folder's path is local: cut

    push_folder(tmp_path / "out", "me/edits", files=["adapter_config.json", "notes/todo.txt"])
    assert sorted(uploads.calls[1]["files"]) == ["adapter_config.json", "notes/todo.txt"]
    with pytest.raises(ValueError, match=r"inside .*out, got '\.\./secret'"):
        push_folder(tmp_path / "out", "me/edits", files=["../secret"])
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        push_folder(tmp_path / "out", "me/edits", files=["missing.bin"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [*report.files, ".env", "stale.bin", "notes"]
    )

    (tmp_path / "plain").mkdir()  # no memit_edits.json: every file but hidden ones
    (tmp_path / "plain" / "weights.bin").write_bytes(b"w")
    (tmp_path / "plain" / ".env").write_text("HF_TOKEN=hf_leaked\n")
    push_folder(tmp_path / "plain", "me/plain")
    assert list(uploads.calls[2]["files"]) == ["weights.bin"]


def test_push_folder_publishes_no_local_path(tmp_path, uploads, caplog):
    base = str(tmp_path / "models" / "my-llama")
    adapter_folder(tmp_path / "out", base)
    with caplog.at_level(logging.WARNING, logger="memit_hf"):
        push_folder(tmp_path / "out", "me/edits")
    (call,) = uploads.calls
    assert json.loads(call["files"]["adapter_config.json"])["base_model_name_or_path"] is None
    assert json.loads(call["files"]["memit_edits.json"])["base_model_name_or_path"] is None
    assert not any(str(tmp_path).encode() in content for content in call["files"].values())
    assert 'PeftModel.from_pretrained(base, "me/edits")' in call["files"]["README.md"].decode()
    assert sum("local path" in r.getMessage() for r in caplog.records) == 1  # one warning per push
    # the local folder keeps the path peft loads the base model from
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["base_model_name_or_path"] == base


def test_push_folder_stages_elsewhere_when_the_folder_is_read_only(tmp_path, uploads):
    report = adapter_folder(tmp_path / "out", "org/base")
    real_mkdtemp, real_mkdir = tempfile.mkdtemp, Path.mkdir

    def mkdtemp(suffix=None, prefix=None, dir=None):
        if dir is not None and Path(dir) == tmp_path / "out":
            raise PermissionError(errno.EROFS, "Read-only file system", str(dir))
        return real_mkdtemp(suffix, prefix, dir)

    def mkdir(self, *args, **kwargs):
        if self.parent == tmp_path / "out":
            raise PermissionError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    with mock.patch.object(tempfile, "mkdtemp", side_effect=mkdtemp), mock.patch.object(Path, "mkdir", mkdir):
        push_folder(tmp_path / "out", "me/edits")
    (call,) = uploads.calls
    assert sorted(call["files"]) == sorted(report.files) and tmp_path / "out" not in call["folder"].parents


def test_output_dir_and_push_to_hub_work_as_in_trainer(tokenizer, fake_hub, tmp_path):
    """`args.output_dir` is the default folder of the saves, and with `args.push_to_hub` a save also pushes what it
    wrote (as `Trainer.save_model` does); without `hub_model_id` it is refused before anything is written."""
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    args = tiny_editing_arguments(
        tmp_path / "stats", output_dir=str(tmp_path / "out"), push_to_hub=True, hub_model_id="me/saved"
    )
    editor = Editor(model, args=args, processing_class=tokenizer, stats_dataset=tiny_corpus())
    editor.edit(subject_final_requests()[:2])
    report = editor.save_adapter()
    assert report.path == str(tmp_path / "out") and (tmp_path / "out" / "adapter_model.safetensors").is_file()
    (upload,) = fake_hub.uploads
    assert upload["repo_id"] == "me/saved" and upload["commit_message"] == "Add 2 fact edits (adapter)"
    assert upload["files"] == ["README.md", "adapter_config.json", "adapter_model.safetensors", "memit_edits.json"]
    editor.merge_and_save(tmp_path / "merged")
    assert fake_hub.uploads[-1]["commit_message"] == "Add 2 fact edits (merged model)"
    assert "model.safetensors" in fake_hub.uploads[-1]["files"]
    editor.args = tiny_editing_arguments(tmp_path / "stats", push_to_hub=True)
    with pytest.raises(ValueError, match="needs `hub_model_id`"):
        editor.save_adapter(tmp_path / "third")
    assert not (tmp_path / "third").exists() and len(fake_hub.uploads) == 2
    editor.args = tiny_editing_arguments(tmp_path / "stats")
    with pytest.raises(ValueError, match="pass `path` or set `EditingArguments\\(output_dir=...\\)`"):
        editor.save_adapter()
