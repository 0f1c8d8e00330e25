"""Tests of `memit_hf.export` and `Editor.save_adapter` / `merge_and_save`: the adapter holds the edit exactly, plain
peft and transformers load it (un-merged, merged, disabled), SVD compression is exact at full rank and reports its
error below it, and the metadata and sizes are right."""

import copy
import errno
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from memit_hf.deltas import LayerDelta
from memit_hf.editor import Editor
from memit_hf.export import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    STAGING_PREFIX,
    STALE_STAGING_SECONDS,
    artefact_files,
    base_model_id,
    check_output_dir,
    combine_deltas,
    compress_delta,
    edit_metadata,
    lora_config,
    prepare_deltas,
    read_edits_metadata,
    remove_stale_staging,
    save_adapter_files,
    save_merged_checkpoint,
)
from tests.testing_utils import (
    TINY_MODEL_TYPES,
    build_tiny_causal_lm,
    build_tiny_tokenizer,
    parameters_snapshot,
    subject_final_requests,
    tiny_corpus,
    tiny_editing_arguments,
)


ATOL = 1e-5
U32, U64 = torch.finfo(torch.float32).eps / 2, torch.finfo(torch.float64).eps / 2


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def logits(model, tokenizer, texts=("The city of the Eiffel Tower", "I think the iPhone is", "Paris and Rome")):
    batch = tokenizer(list(texts), return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


def random_delta(d_out, d_in, rank, seed=0, name="m", fan_in_fan_out=False):
    generator = torch.Generator().manual_seed(seed)
    return LayerDelta(
        name,
        torch.randn(d_out, rank, generator=generator),
        torch.randn(rank, d_in, generator=generator) / 100,
        fan_in_fan_out,
    )


class EditedAndSaved:
    """A tiny model edited in place, an unedited copy, and the adapter of the edit saved to disk."""

    def __init__(self, model_type, tokenizer, directory):
        self.model_type = model_type
        self.base = build_tiny_causal_lm(model_type, vocab_size=len(tokenizer))
        self.model = copy.deepcopy(self.base)
        self.editor = Editor(
            self.model,
            args=tiny_editing_arguments(directory / "stats"),
            processing_class=tokenizer,
            stats_dataset=tiny_corpus(),
        )
        self.output = self.editor.edit(subject_final_requests())
        self.path = directory / "adapter"
        self.report = self.editor.save_adapter(self.path, base_model_name_or_path="tiny/base")
        self.exact = copy.deepcopy(self.base).double()  # the exact edit: float64 weights plus float64 B @ A
        with torch.no_grad():
            for delta in self.output.deltas:
                update = delta.lora_B.double() @ delta.lora_A.double()
                self.exact.get_submodule(delta.module_name).weight += update.T if delta.fan_in_fan_out else update
        self.exact_logits = logits(self.exact, tokenizer)
        scale = float(self.exact_logits.abs().max())
        # The float32 in-place model's own distance from the exact edit is the float32 arithmetic error of this
        # forward; an adapter path (two products per edited module instead of one) may have a few times that.
        self.float32_tolerance = 4 * float((logits(self.model, tokenizer) - self.exact_logits).abs().max())
        self.float32_tolerance += 8 * U32 * scale
        # In float64 the stored float32 factors are represented exactly: what is left is float64 rounding, at most
        # about d * u64 per dot product of length d = 32 over a few dozen products in sequence.
        self.float64_tolerance = 64 * 32 * U64 * scale


@pytest.fixture(scope="module", params=TINY_MODEL_TYPES)
def saved(request, tokenizer, tmp_path_factory):
    return EditedAndSaved(request.param, tokenizer, tmp_path_factory.mktemp(f"export-{request.param}"))


# ----------------------------------------------------------------------------------- loading with plain peft
def test_peft_adapter_in_float64_is_the_exact_edit(saved, tokenizer):
    """On a float64 copy of the base, the loaded adapter reproduces the exact edit (base + B @ A in float64) to
    float64 rounding: the file holds the factors without loss."""
    peft_model = PeftModel.from_pretrained(copy.deepcopy(saved.base).double(), saved.path)
    assert (logits(peft_model, tokenizer) - saved.exact_logits).abs().max() <= saved.float64_tolerance


def test_peft_adapter_equals_in_place_edit(saved, tokenizer):
    expected, unedited = logits(saved.model, tokenizer), logits(saved.base, tokenizer)
    base = copy.deepcopy(saved.base)
    original = parameters_snapshot(base)
    peft_model = PeftModel.from_pretrained(base, saved.path)
    assert (logits(peft_model, tokenizer).double() - saved.exact_logits).abs().max() <= saved.float32_tolerance
    assert (logits(peft_model, tokenizer) - unedited).abs().max() > 100 * ATOL  # the adapter does something
    with peft_model.disable_adapter():
        assert torch.equal(logits(peft_model, tokenizer), unedited)  # bit for bit
    merged = peft_model.merge_and_unload()
    assert type(merged) is type(saved.base)
    assert (logits(merged, tokenizer).double() - saved.exact_logits).abs().max() <= saved.float32_tolerance
    assert (logits(merged, tokenizer) - expected).abs().max() <= saved.float32_tolerance
    changed = sorted(name for name, p in merged.named_parameters() if not torch.equal(p, original[name]))
    assert changed == sorted(d.module_name + ".weight" for d in saved.output.deltas)


def test_transformers_load_adapter_equals_in_place_edit(saved, tokenizer):
    base = copy.deepcopy(saved.base)
    base.load_adapter(str(saved.path))
    assert base.active_adapters() == ["default"]
    assert (logits(base, tokenizer).double() - saved.exact_logits).abs().max() <= saved.float32_tolerance
    base.disable_adapters()
    assert torch.equal(logits(base, tokenizer), logits(saved.base, tokenizer))


def test_adapter_files_and_config(saved):
    config = json.loads((saved.path / ADAPTER_CONFIG_NAME).read_text())
    names = [d.module_name for d in saved.output.deltas]
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == "tiny/base"
    assert sorted(config["target_modules"]) == sorted(names)
    assert config["r"] == config["lora_alpha"] == 4
    assert set(config["rank_pattern"].values()) == {4} and config["rank_pattern"] == config["alpha_pattern"]
    assert config["fan_in_fan_out"] is (saved.model_type == "gpt2")
    assert config["use_rslora"] is False and config["lora_dropout"] == 0.0
    tensors = load_file(saved.path / ADAPTER_WEIGHTS_NAME)
    for delta in saved.output.deltas:
        # the exact factors of the solve, not a re-factorisation
        assert torch.equal(tensors[f"base_model.model.{delta.module_name}.lora_A.weight"], delta.lora_A)
        assert torch.equal(tensors[f"base_model.model.{delta.module_name}.lora_B.weight"], delta.lora_B)
    assert saved.report.reconstruction_errors == dict.fromkeys(names, 0.0)
    assert saved.report.adapter_bytes < saved.report.dense_bytes  # rank 4 is far below the break-even rank
    assert saved.report.num_parameters == sum(4 * (d.lora_A.shape[1] + d.lora_B.shape[0]) for d in saved.output.deltas)


def test_edit_metadata_and_model_card(saved):
    metadata = read_edits_metadata(saved.path)
    assert metadata["model_type"] == saved.model_type and metadata["num_edits"] == 4
    assert metadata["base_model_name_or_path"] == "tiny/base"
    (batch,) = metadata["batches"]
    assert batch["algorithm"] == "memit" and batch["layers"] == [0, 1]
    assert [r["target_new"] for r in batch["requests"]] == [r["target_new"] for r in subject_final_requests()]
    assert batch["hyperparameters"]["algorithm_config"] == {"mom2_update_weight": 1.0}
    assert "hub_token" not in batch["hyperparameters"]
    assert set(batch["statistics"]) == {d.module_name for d in saved.output.deltas}
    for info in batch["statistics"].values():
        assert len(info["key"]) == 24 and info["count"] > 0 and info["corpus"].startswith("tokens:")
    assert len(batch["requests_sha256"]) == 64 and metadata["memit_hf_version"]
    assert metadata["export"]["max_reconstruction_error"] == 0.0
    card = (saved.path / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: peft" in card and "base_model: tiny/base" in card
    assert (
        "base_model:adapter:tiny/base" in card and "| the Eiffel Tower | The city of _the Eiffel Tower_ | Rome" in card
    )
    assert "PeftModel.from_pretrained" in card and "huggingface.co/papers/2210.07229" in card
    assert "The adapter stores the update exactly (ranks [4]" in card  # the card reports the export it sits beside


def test_auto_model_loads_adapter_directory(tokenizer, tmp_path):
    base = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    model = copy.deepcopy(base)
    editor = Editor(
        model, args=tiny_editing_arguments(tmp_path / "stats"), processing_class=tokenizer, stats_dataset=tiny_corpus()
    )
    editor.edit(subject_final_requests())
    editor.save_adapter(tmp_path / "adapter", base_model_name_or_path=str(base_dir))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert type(loaded) is type(base) and loaded.active_adapters() == ["default"]
    assert (logits(loaded.eval(), tokenizer) - logits(model, tokenizer)).abs().max() <= ATOL


def test_merge_and_save_loads_with_from_pretrained(saved, tokenizer, tmp_path):
    saved.editor.merge_and_save(tmp_path / "merged", base_model_name_or_path="tiny/base")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager").eval()
    weights = dict(saved.model.named_parameters())
    assert all(torch.equal(p, weights[name]) for name, p in loaded.named_parameters())  # bit for bit
    assert torch.equal(logits(loaded, tokenizer), logits(saved.model, tokenizer))
    assert (tmp_path / "merged" / "tokenizer.json").exists()
    assert read_edits_metadata(tmp_path / "merged")["num_edits"] == 4
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "library_name: transformers" in card and "lora" not in card.split("---")[1]


@pytest.mark.parametrize("saved", ["llama"], indirect=True)
def test_editor_saves_refuse_to_mix_kinds_unless_overwritten(saved, tmp_path):
    """`Editor.save_adapter` / `merge_and_save` refuse a folder holding the other kind (checked on every process
    before anything is written) and replace it with `overwrite_output_dir=True`."""
    saved.editor.merge_and_save(tmp_path / "out", base_model_name_or_path="tiny/base")
    before = folder_state(tmp_path / "out")
    with pytest.raises(ValueError, match="already holds a full model checkpoint"):
        saved.editor.save_adapter(tmp_path / "out")
    assert folder_state(tmp_path / "out") == before
    saved.editor.save_adapter(tmp_path / "out", overwrite_output_dir=True)
    assert (tmp_path / "out" / ADAPTER_WEIGHTS_NAME).is_file() and not (tmp_path / "out" / "config.json").exists()
    with pytest.raises(ValueError, match="already holds a peft adapter"):
        saved.editor.merge_and_save(tmp_path / "out")
    saved.editor.merge_and_save(tmp_path / "out", overwrite_output_dir=True)
    assert (tmp_path / "out" / "config.json").is_file() and not (tmp_path / "out" / ADAPTER_WEIGHTS_NAME).exists()


def test_nothing_to_export(tokenizer, tmp_path):
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    editor = Editor(model, args=tiny_editing_arguments(tmp_path), processing_class=tokenizer)
    with pytest.raises(ValueError, match="holds no edit"):
        editor.save_adapter(tmp_path / "adapter")
    with pytest.raises(ValueError, match="no edit to export"):
        save_adapter_files([], tmp_path / "adapter")


def test_save_adapter_keeps_other_files(saved, tmp_path):
    (tmp_path / "edit_metrics.json").write_text("{}")
    saved.editor.save_adapter(tmp_path)
    assert (tmp_path / "edit_metrics.json").read_text() == "{}"
    assert (tmp_path / ADAPTER_CONFIG_NAME).exists() and not list(tmp_path.glob(".*"))


# ------------------------------------------------------------------------------- successive edits and ranks
@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_successive_edits_export_as_their_sum(model_type, tokenizer, tmp_path):
    base = build_tiny_causal_lm(model_type, vocab_size=len(tokenizer))
    model = copy.deepcopy(base)
    editor = Editor(
        model,
        args=tiny_editing_arguments(tmp_path / "stats", v_num_grad_steps=8),
        processing_class=tokenizer,
        stats_dataset=tiny_corpus(),
    )
    requests = subject_final_requests()
    editor.edit(requests[:2])
    editor.edit(requests[2:])
    report = editor.save_adapter(tmp_path / "adapter")
    assert set(report.ranks.values()) == {4}
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter")
    assert (logits(peft_model, tokenizer) - logits(model, tokenizer)).abs().max() <= ATOL
    assert [len(b["requests"]) for b in read_edits_metadata(tmp_path / "adapter")["batches"]] == [2, 2]


def test_combine_deltas_is_the_exact_sum():
    a, b = random_delta(8, 12, 3, seed=0), random_delta(8, 12, 2, seed=1)
    other = random_delta(8, 12, 1, seed=2, name="other")
    combined = combine_deltas([a, other, b])
    assert [d.module_name for d in combined] == ["m", "other"]
    assert combined[0].rank == 5 and combined[1] is other
    torch.testing.assert_close(combined[0].dense(), a.dense() + b.dense(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_compress_above_full_rank_is_exact(fan_in_fan_out):
    delta = random_delta(16, 24, 40, fan_in_fan_out=fan_in_fan_out)
    (compressed,), errors = prepare_deltas([delta])
    assert compressed.rank == 16 and compressed.fan_in_fan_out is fan_in_fan_out
    exact = delta.lora_B.double() @ delta.lora_A.double()
    relative = (compressed.lora_B.double() @ compressed.lora_A.double() - exact).norm() / exact.norm()
    assert relative <= 1e-6 and errors["m"] <= 1e-6
    # balanced factors: B and A^T have the same column norms
    torch.testing.assert_close(compressed.lora_B.norm(dim=0), compressed.lora_A.norm(dim=1), rtol=1e-4, atol=0)


def test_compress_below_rank_reports_its_error():
    delta = random_delta(20, 30, 10)
    exact = delta.lora_B.double() @ delta.lora_A.double()
    singular = torch.linalg.svdvals(exact)
    for rank in (1, 4, 9):
        compressed, error = compress_delta(delta, rank)
        measured = float((compressed.lora_B.double() @ compressed.lora_A.double() - exact).norm() / exact.norm())
        expected = float(singular[rank:].pow(2).sum().sqrt() / singular.pow(2).sum().sqrt())
        assert compressed.rank == rank
        assert error == pytest.approx(expected, rel=1e-6) and measured == pytest.approx(expected, rel=1e-4)
    energy = singular.pow(2).cumsum(0) / singular.pow(2).sum()
    compressed, _ = compress_delta(delta, 0.9)
    assert compressed.rank == int((energy < 0.9).sum()) + 1
    assert compress_delta(delta, 1.0)[0].rank == 10
    with pytest.raises(ValueError, match="at least 1"):
        compress_delta(delta, 0)
    with pytest.raises(ValueError, match="fraction"):
        compress_delta(delta, 1.5)
    with pytest.raises(TypeError, match="export_rank"):
        compress_delta(delta, "4")


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_large_edit_is_stored_at_full_rank_exactly(model_type, tokenizer, tmp_path):
    """36 edit keys exceed min(d_in, d_out) = 32: the adapter holds the SVD re-factorisation at rank 32, equal to the
    in-place edit; with `export_rank` the loss is reported."""
    base = build_tiny_causal_lm(model_type, vocab_size=len(tokenizer))
    model = copy.deepcopy(base)
    words = sorted({w.strip(".,") for text in tiny_corpus() for w in text.split() if w.isalpha() and len(w) > 3})
    requests = [{"prompt": "The city of {}", "subject": words[i], "target_new": words[-1 - i]} for i in range(36)]
    editor = Editor(
        model,
        args=tiny_editing_arguments(tmp_path / "stats", v_num_grad_steps=2),
        processing_class=tokenizer,
        stats_dataset=tiny_corpus(),
    )
    output = editor.edit(requests)
    assert {d.rank for d in output.deltas} == {36}
    report = editor.save_adapter(tmp_path / "adapter")
    assert set(report.ranks.values()) == {32} and report.max_reconstruction_error <= 1e-5
    for delta in output.deltas:
        tensors = load_file(tmp_path / "adapter" / ADAPTER_WEIGHTS_NAME)
        prefix = f"base_model.model.{delta.module_name}"
        stored = tensors[f"{prefix}.lora_B.weight"].double() @ tensors[f"{prefix}.lora_A.weight"].double()
        exact = delta.lora_B.double() @ delta.lora_A.double()
        assert (stored - exact).norm() / exact.norm() <= 1e-5
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter")
    assert (logits(peft_model, tokenizer) - logits(model, tokenizer)).abs().max() <= ATOL
    low = editor.save_adapter(tmp_path / "low", export_rank=4)
    assert set(low.ranks.values()) == {4} and 0.01 < low.max_reconstruction_error < 1
    assert read_edits_metadata(tmp_path / "low")["export"]["export_rank"] == 4


# ------------------------------------------------------------------------------------------------ helpers
def test_lora_config_rank_patterns_match_only_their_module():
    deltas = [
        random_delta(8, 4, 2, name="model.layers.1.mlp.down_proj"),
        random_delta(8, 4, 3, name="model.layers.11.mlp.down_proj"),
    ]
    config = lora_config(deltas, "org/model")
    from peft.utils.other import get_pattern_key

    for name, rank in (("model.layers.1.mlp.down_proj", 2), ("model.layers.11.mlp.down_proj", 3)):
        assert config.rank_pattern[get_pattern_key(config.rank_pattern.keys(), name)] == rank
    assert get_pattern_key(config.rank_pattern.keys(), "model.layers.21.mlp.down_proj") not in config.rank_pattern
    assert config.r == config.lora_alpha == 3 and config.base_model_name_or_path == "org/model"
    with pytest.raises(ValueError, match="Conv1D"):
        lora_config([random_delta(8, 4, 1, name="a"), random_delta(8, 4, 1, name="b", fan_in_fan_out=True)])


def test_base_model_id(tmp_path, tiny_llama):
    tiny_llama.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model_id(tiny_llama) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model_id(tiny_llama, "org/other") == "org/other"
    tiny_llama.config._name_or_path = str(tmp_path)  # a temporary directory: never recorded
    assert base_model_id(tiny_llama) is None
    tiny_llama.config._name_or_path = ""
    assert base_model_id(tiny_llama) is None


def test_edit_output_saves_its_own_batch(tokenizer, tmp_path):
    """`EditOutput.save_adapter` exports one `edit()` call alone: after two edits, the second batch's adapter on top
    of the model edited by the first batch gives the final model."""
    base = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    model = copy.deepcopy(base)
    editor = Editor(
        model,
        args=tiny_editing_arguments(tmp_path / "stats", v_num_grad_steps=8),
        processing_class=tokenizer,
        stats_dataset=tiny_corpus(),
    )
    requests = subject_final_requests()
    first = editor.edit(requests[:2])
    after_first = copy.deepcopy(model)
    second = editor.edit(requests[2:])
    report = second.save_adapter(tmp_path / "second", base_model_name_or_path="tiny/base")
    assert set(report.ranks.values()) == {2}
    metadata = read_edits_metadata(tmp_path / "second")
    assert metadata["num_edits"] == 2 and [r["subject"] for r in metadata["batches"][0]["requests"]] == [
        r["subject"] for r in requests[2:]
    ]
    stacked = PeftModel.from_pretrained(after_first, tmp_path / "second")
    assert (logits(stacked, tokenizer) - logits(model, tokenizer)).abs().max() <= ATOL
    first.save_adapter(tmp_path / "first", export_rank=1)
    assert json.loads((tmp_path / "first" / ADAPTER_CONFIG_NAME).read_text())["r"] == 1


def test_include_requests_false_writes_nothing_of_the_requests(tokenizer, tmp_path):
    """The privacy switch of `save_adapter`, `EditOutput.save_adapter` and `merge_and_save`: no prompt, subject,
    target, paraphrase or neighborhood prompt appears in any file written; the counts and the SHA-256 remain."""
    requests = [
        dict(
            r,
            paraphrase_prompts=["Because " + r["prompt"].format(r["subject"])],
            neighborhood_prompts=["The capital of Italy"],
        )
        for r in subject_final_requests()
    ]
    editor = Editor(
        build_tiny_causal_lm("llama", vocab_size=len(tokenizer)),
        args=tiny_editing_arguments(tmp_path / "stats", v_num_grad_steps=2),
        processing_class=tokenizer,
        stats_dataset=tiny_corpus(),
    )
    output = editor.edit(requests)
    secrets = set()
    for r in requests:
        secrets |= {r["prompt"], r["prompt"].format(r["subject"]), *r["prompt"].split("{}"), r["subject"]}
        secrets |= {r["target_new"], r["target_true"], *r["paraphrase_prompts"], *r["neighborhood_prompts"]}
    secrets = {secret.strip() for secret in secrets} - {""}

    editor.save_adapter(tmp_path / "public", base_model_name_or_path="tiny/base")
    public = read_edits_metadata(tmp_path / "public")
    for name in ("memit_edits.json", "README.md"):  # the files list the requests by default: the search has teeth
        text = (tmp_path / "public" / name).read_text()
        assert all(r["subject"] in text and r["target_new"] in text for r in requests), name

    editor.save_adapter(tmp_path / "adapter", base_model_name_or_path="tiny/base", include_requests=False)
    output.save_adapter(tmp_path / "output", base_model_name_or_path="tiny/base", include_requests=False)
    editor.merge_and_save(tmp_path / "merged", base_model_name_or_path="tiny/base", include_requests=False)
    for folder in ("adapter", "output", "merged"):
        # What memit-hf writes (a merged checkpoint's tokenizer files hold its vocabulary, words of targets included).
        names = ["memit_edits.json", "README.md"] + (["config.json"] if folder == "merged" else [ADAPTER_CONFIG_NAME])
        for name in names:
            text = (tmp_path / folder / name).read_text()
            leaked = sorted(secret for secret in secrets if secret in text)
            assert not leaked, (folder, name, leaked)
        metadata = read_edits_metadata(tmp_path / folder)
        assert metadata["num_edits"] == 4
        (batch,) = metadata["batches"]
        assert batch["requests"] is None and batch["num_requests"] == 4
        assert batch["requests_sha256"] == public["batches"][0]["requests_sha256"]
        assert "The requests were not stored" in (tmp_path / folder / "README.md").read_text()


# ------------------------------------------------------------------------ output folders: one artefact, staged
def folder_state(path):
    """Every file under `path` (hidden ones included) with its bytes, for before/after comparisons."""
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def small_adapter(path, base="tiny/base", **kwargs):
    """A two-module adapter with metadata, written by `save_adapter_files`."""
    deltas = [
        random_delta(32, 64, 2, seed=0, name="model.layers.0.mlp.down_proj"),
        random_delta(32, 64, 2, seed=1, name="model.layers.1.mlp.down_proj"),
    ]
    metadata = {"base_model_name_or_path": base, "num_edits": 2, "batches": []}
    return save_adapter_files(deltas, path, base, None, None, metadata, **kwargs)


@pytest.fixture
def tiny_checkpoint(tokenizer):
    return build_tiny_causal_lm("llama", vocab_size=len(tokenizer)), tokenizer


CHECKPOINT_METADATA = {"base_model_name_or_path": "tiny/base", "num_edits": 0, "batches": []}


def test_merged_checkpoint_is_refused_in_an_adapter_folder_unless_overwritten(tiny_checkpoint, tmp_path):
    """An adapter beside merged weights would be applied on top of them by `from_pretrained` (a double edit): saving a
    checkpoint where an adapter is raises, naming the folder and the files; `overwrite_output_dir=True` removes the
    adapter's files (only those: other files stay) and writes the checkpoint."""
    model, tokenizer = tiny_checkpoint
    out = tmp_path / "out"
    small_adapter(out)
    (out / "notes.txt").write_text("mine")
    before = folder_state(out)
    with pytest.raises(ValueError) as error:
        save_merged_checkpoint(model, tokenizer, out, CHECKPOINT_METADATA)
    message = str(error.value)
    assert str(out) in message and "adapter_config.json, adapter_model.safetensors" in message
    assert "overwrite_output_dir=True" in message
    assert folder_state(out) == before  # refused before anything was written

    files = save_merged_checkpoint(model, tokenizer, out, CHECKPOINT_METADATA, overwrite_output_dir=True)
    assert not (out / ADAPTER_CONFIG_NAME).exists() and not (out / ADAPTER_WEIGHTS_NAME).exists()
    assert (out / "notes.txt").read_text() == "mine"
    assert {"config.json", "model.safetensors", "tokenizer.json", "memit_edits.json", "README.md"} <= set(files)
    assert sorted(p.name for p in out.iterdir()) == sorted([*files, "notes.txt"])
    assert read_edits_metadata(out)["files"] == files
    loaded = AutoModelForCausalLM.from_pretrained(out)  # a plain model: no adapter on top
    assert all(torch.equal(p, dict(model.named_parameters())[name]) for name, p in loaded.named_parameters())


def test_adapter_is_refused_in_a_checkpoint_folder_unless_overwritten(tiny_checkpoint, tmp_path):
    model, tokenizer = tiny_checkpoint
    out = tmp_path / "out"
    checkpoint_files = save_merged_checkpoint(model, tokenizer, out, CHECKPOINT_METADATA)
    (out / "edit_metrics.json").write_text("{}")
    before = folder_state(out)
    with pytest.raises(ValueError, match=r"already holds a full model checkpoint \(config\.json, ") as error:
        small_adapter(out)
    assert str(out) in str(error.value) and "model.safetensors" in str(error.value)
    assert folder_state(out) == before

    report = small_adapter(out, overwrite_output_dir=True)
    assert report.files == ["README.md", ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, "memit_edits.json"]
    # The checkpoint's files are gone, tokenizer and generation config included; what is not a checkpoint file stays.
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(
        checkpoint_files
    )
    assert sorted(p.name for p in out.iterdir()) == sorted([*report.files, "edit_metrics.json"])


def test_tokenizer_files_beside_an_adapter_are_no_checkpoint(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    tokenizer_files = sorted(p.name for p in tmp_path.iterdir())
    report = small_adapter(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*tokenizer_files, *report.files])
    assert artefact_files(tmp_path, "adapter") == [ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME]
    assert check_output_dir(tmp_path, "adapter") == []
    with pytest.raises(ValueError, match="`kind` must be one of"):
        artefact_files(tmp_path, "merged")


def test_rewriting_an_artefact_removes_the_files_the_new_one_lacks(tiny_checkpoint, tmp_path):
    """A checkpoint saved again in fewer shards leaves no stale shard or index (transformers' own clean-up of
    `save_pretrained`); an adapter replaces an older `adapter_model.bin`."""
    model, tokenizer = tiny_checkpoint
    sharded = save_merged_checkpoint(model, tokenizer, tmp_path / "merged", CHECKPOINT_METADATA, max_shard_size="40KB")
    assert "model.safetensors.index.json" in sharded and sum(name.startswith("model-") for name in sharded) > 1
    files = save_merged_checkpoint(model, tokenizer, tmp_path / "merged", CHECKPOINT_METADATA)
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == files
    assert "model.safetensors" in files and not any(name.startswith("model-") for name in files)

    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_model.bin").write_bytes(b"old weights")
    report = small_adapter(tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == report.files


def test_staging_happens_inside_the_output_folder(tiny_checkpoint, tmp_path):
    """A mounted volume's root (`--output-dir /output`) is writable while its parent is not: the writes stage inside
    the output folder, never beside it. As root, `chmod` does not stop writes: the refusal of the read-only parent is
    then made by `Path.mkdir` and `tempfile.mkdtemp` themselves."""
    model, tokenizer = tiny_checkpoint
    parent = tmp_path / "root"
    volume = parent / "output"
    volume.mkdir(parents=True)
    real_mkdtemp, real_mkdir, staged_in = tempfile.mkdtemp, Path.mkdir, []

    def refuse_in_parent(folder):
        if Path(folder).resolve().parent == parent.resolve() and Path(folder).name != "output":
            raise PermissionError(errno.EACCES, "Permission denied", str(folder))

    def mkdtemp(suffix=None, prefix=None, dir=None):
        if dir is not None and Path(dir).resolve() == parent.resolve():
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return real_mkdtemp(suffix, prefix, dir)

    def mkdir(self, *args, **kwargs):
        refuse_in_parent(self)
        if self.name.startswith(STAGING_PREFIX):
            staged_in.append(self.parent.resolve())
        return real_mkdir(self, *args, **kwargs)

    parent.chmod(0o555)
    try:
        with mock.patch.object(tempfile, "mkdtemp", side_effect=mkdtemp), mock.patch.object(Path, "mkdir", mkdir):
            report = small_adapter(volume)
            assert sorted(p.name for p in volume.iterdir()) == report.files  # no staging folder left
            save_merged_checkpoint(model, tokenizer, volume / "merged", CHECKPOINT_METADATA)
    finally:
        parent.chmod(0o755)
    assert staged_in == [volume.resolve(), (volume / "merged").resolve()]
    assert sorted(p.name for p in parent.iterdir()) == ["output"]
    assert (volume / "merged" / "config.json").is_file()


def test_stale_staging_folders_are_removed_and_live_ones_kept(tmp_path):
    """A killed run leaves its `.staging-<pid>-*` folder: the next write removes it when its process is gone or when
    it is more than a day old, and keeps one a live process is writing."""
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()  # a process id that no longer runs
    dead = tmp_path / f"{STAGING_PREFIX}{finished.pid}-abc"
    live = tmp_path / f"{STAGING_PREFIX}{os.getpid()}-def"
    old = tmp_path / f"{STAGING_PREFIX}{os.getpid()}-ghi"
    other = tmp_path / ".cache"
    for folder in (dead, live, old, other):
        folder.mkdir()
        (folder / ADAPTER_WEIGHTS_NAME).write_bytes(b"partial")
    two_days_ago = time.time() - 2 * STALE_STAGING_SECONDS
    os.utime(old, (two_days_ago, two_days_ago))
    assert remove_stale_staging(tmp_path) == sorted([dead.name, old.name])
    assert live.is_dir() and other.is_dir() and not dead.exists() and not old.exists()

    dead.mkdir()
    report = small_adapter(tmp_path)  # every write cleans up first
    assert not dead.exists() and live.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*report.files, live.name, other.name])


def test_a_failed_adapter_write_leaves_the_previous_adapter(tmp_path):
    """The new adapter's config and weights are staged, then its metadata cannot be written: the folder keeps the
    previous adapter byte for byte, and no staging folder."""
    small_adapter(tmp_path / "out")
    before = folder_state(tmp_path / "out")
    loop = []
    loop.append(loop)  # JSON cannot encode it: `memit_edits.json` fails after the weights were written
    deltas = [random_delta(32, 64, 3, seed=5, name="model.layers.0.mlp.down_proj")]
    with pytest.raises(ValueError, match="Circular reference"):
        save_adapter_files(deltas, tmp_path / "out", "tiny/base", metadata={"batches": [], "loop": loop})
    assert folder_state(tmp_path / "out") == before


def test_a_failed_checkpoint_save_leaves_the_previous_checkpoint(tiny_checkpoint, tmp_path):
    model, tokenizer = tiny_checkpoint
    save_merged_checkpoint(model, tokenizer, tmp_path / "out", CHECKPOINT_METADATA)
    before = folder_state(tmp_path / "out")

    class FullDisk:
        def save_pretrained(self, path):
            raise OSError(errno.ENOSPC, "No space left on device")

    changed = build_tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=1)
    with pytest.raises(OSError, match="No space left"):  # the model's weights were staged, the tokenizer fails
        save_merged_checkpoint(changed, FullDisk(), tmp_path / "out", CHECKPOINT_METADATA)
    assert folder_state(tmp_path / "out") == before


def test_for_hub_exports_name_no_local_path(tiny_checkpoint, tmp_path, caplog):
    """A base model loaded from a local folder: local saves record its path (peft loads the base from it), exports
    `for_hub` write `None` with a warning, and no absolute local path appears in any file they write."""
    model, tokenizer = tiny_checkpoint
    base = tmp_path / "models" / "my-llama"
    local = {
        "base_model_name_or_path": str(base),
        "num_edits": 0,
        "batches": [
            {
                "algorithm": "memit",
                "num_requests": 0,
                "requests": [],
                "hyperparameters": {
                    "layers": [0],
                    "output_dir": str(tmp_path / "out"),
                    "stats_repo": str(tmp_path / "stats"),
                },
                "statistics": {"m": {"corpus": f"stats_repo:{tmp_path / 'stats'}", "num_tokens": 10}},
                "source": {"requests": str(tmp_path / "requests.jsonl"), "corpus": [str(tmp_path / "wiki.txt")]},
            }
        ],
    }
    deltas = [random_delta(32, 64, 2, name="model.layers.0.mlp.down_proj")]
    save_adapter_files(deltas, tmp_path / "local", str(base), None, None, local)
    assert json.loads((tmp_path / "local" / ADAPTER_CONFIG_NAME).read_text())["base_model_name_or_path"] == str(base)
    assert read_edits_metadata(tmp_path / "local")["base_model_name_or_path"] == str(base)

    with caplog.at_level(logging.WARNING, logger="memit_hf"):
        report = save_adapter_files(deltas, tmp_path / "hub", str(base), None, None, local, for_hub=True)
        files = save_merged_checkpoint(model, tokenizer, tmp_path / "merged", local, for_hub=True)
    warnings = [r.getMessage() for r in caplog.records if "local path" in r.getMessage()]
    assert len(warnings) == 2 and all('base_model_name_or_path="<hub id>"' in w for w in warnings)
    assert json.loads((tmp_path / "hub" / ADAPTER_CONFIG_NAME).read_text())["base_model_name_or_path"] is None
    for folder, written in (("hub", report.files), ("merged", files)):
        metadata = read_edits_metadata(tmp_path / folder)
        assert metadata["base_model_name_or_path"] is None
        (batch,) = metadata["batches"]
        assert batch["source"] == {"requests": "requests.jsonl", "corpus": ["wiki.txt"]}
        assert batch["statistics"]["m"]["corpus"] == "stats_repo:stats"
        for name in written:
            text = (tmp_path / folder / name).read_text(errors="replace")
            assert str(tmp_path) not in text, (folder, name)
    assert "base_model:" not in (tmp_path / "hub" / "README.md").read_text().split("---")[1]


def test_model_card_of_a_local_save_prints_no_local_path(tmp_path):
    report_dir = tmp_path / "adapter"
    small_adapter(report_dir, base=str(tmp_path / "models" / "my-llama"))
    card = (report_dir / "README.md").read_text()
    assert str(tmp_path) not in card and "`my-llama`" in card


def test_edit_metadata_and_arguments_hold_no_token():
    arguments = {
        "layers": [1],
        "hub_token": "hf_secret",
        "model_init_kwargs": {"token": "hf_init", "dtype": "float32"},
    }
    metadata = edit_metadata({"base_model_name_or_path": "org/base"}, [{"hyperparameters": arguments}])
    assert "hf_secret" not in json.dumps(metadata) and "hf_init" not in json.dumps(metadata)
