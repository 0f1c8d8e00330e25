"""The persisted editor state: save, continue in another process, refuse a foreign state, roll back across it."""

import copy
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
from memit_hf.statistics import legacy_fingerprint_key
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


def continue_args(tmp_path, **flat):
    """The arguments that continue a state of [`make_editor`]: the state never says where statistics are cached."""
    return tiny_editing_arguments(tmp_path / "stats", **{**FLAT, **flat})


CONTINUE_SCRIPT = """
import sys, torch
from safetensors.torch import save_file
from memit_hf.editor import Editor
from tests.testing_utils import (build_tiny_causal_lm, build_tiny_tokenizer, subject_final_requests, tiny_corpus,
                                 tiny_editing_arguments)
torch.set_num_threads(1)
tokenizer = build_tiny_tokenizer()
model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
args = tiny_editing_arguments(sys.argv[4], algorithm="memit_seq", mom2_update_weight=1.0, v_num_grad_steps=8)
editor = Editor.from_state(model, sys.argv[1], args=args, processing_class=tokenizer, stats_dataset=tiny_corpus())
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
    paths = [
        str(tmp_path / "state"),
        str(tmp_path / "weights.safetensors"),
        str(tmp_path / "state2"),
        str(tmp_path / "stats"),
    ]
    result = subprocess.run(
        [sys.executable, "-c", CONTINUE_SCRIPT, *paths], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
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
    continued = Editor.from_state(
        fresh,
        tmp_path / "state",
        args=continue_args(tmp_path),
        processing_class=tokenizer,
        stats_dataset=tiny_corpus(),
    )
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
    continuing = dict(args=continue_args(tmp_path), **kwargs)

    other = build_tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=1)
    snapshot = parameters_snapshot(other)
    with pytest.raises(StateMismatchError, match="was made for another model.*embedding_digest"):
        Editor.from_state(other, tmp_path / "state", **continuing)
    assert changed_tensors(other, snapshot) == []

    # The right architecture and embeddings, but the edits already merged in: refused, not applied twice.
    merged = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    merged.load_state_dict(editor.model.state_dict())
    with pytest.raises(StateMismatchError, match=r"weight of `model\.layers\.\d\.mlp\.down_proj` differs"):
        Editor.from_state(merged, tmp_path / "state", **continuing)

    base = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    with pytest.raises(StateMismatchError, match="statistics of `model.layers.0.mlp.down_proj`"):
        Editor.from_state(
            base,
            tmp_path / "state",
            args=continue_args(tmp_path),
            processing_class=tokenizer,
            stats_dataset=tiny_corpus()[:20],
        )
    with pytest.raises(StateMismatchError, match="holds `memit_seq`.*but `args` say `memit`"):
        Editor.from_state(base, tmp_path / "state", args=tiny_editing_arguments(tmp_path / "stats"), **kwargs)
    with pytest.raises(FileNotFoundError, match="No editor state"):
        Editor.from_state(base, tmp_path / "nothing", **continuing)


def test_a_state_continues_wherever_the_model_and_tokenizer_were_loaded_from(tokenizer, tmp_path):
    """The statistics key leaves out where the model and tokenizer were loaded from, so a state continues with the
    same weights and tokenizer loaded from another place (before, a benchmark's state saved on a first run, which
    read the tokenizer from the GGUF file, was refused by the next, which read it from the converted copy); a state
    an earlier version saved, whose keys hashed the load locations too, continues as well."""
    editor = saved_two_batches(tokenizer, tmp_path)
    edited = parameters_snapshot(editor.model)
    layers = editor.resolved_args.layers
    moved = copy.deepcopy(tokenizer)
    moved.name_or_path = "/somewhere/else"
    fresh = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    fresh.config._name_or_path = "/somewhere/else/model"
    kwargs = dict(args=continue_args(tmp_path), stats_dataset=tiny_corpus())
    continued = Editor.from_state(fresh, tmp_path / "state", processing_class=moved, **kwargs)
    assert changed_tensors(fresh, edited) == [] and len(continued.history) == 2
    assert continued.statistics.num_collections == 0

    base = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    unedited = Editor(base, processing_class=tokenizer, **kwargs)  # the statistics' fingerprints are of the base
    fingerprints = unedited.statistics.fingerprints(layers)
    legacy = {editor.layout.edit_name(layer): legacy_fingerprint_key(fp) for layer, fp in fingerprints.items()}
    assert set(legacy.values()).isdisjoint(read_state(tmp_path / "state").statistics.values())
    rewrite_state(tmp_path / "state", lambda tensors, manifest: manifest.update(statistics=legacy))
    continued = Editor.from_state(base, tmp_path / "state", processing_class=tokenizer, **kwargs)
    assert changed_tensors(base, edited) == [] and len(continued.history) == 2
    # A legacy key names the load location: the state of an earlier version made elsewhere is refused, untouched.
    other = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    snapshot = parameters_snapshot(other)
    with pytest.raises(StateMismatchError, match="statistics of `model.layers.0.mlp.down_proj`"):
        Editor.from_state(other, tmp_path / "state", processing_class=moved, **kwargs)
    assert changed_tensors(other, snapshot) == []


def test_a_stateful_method_refuses_new_statistics_mid_sequence(tokenizer, tmp_path):
    editor = make_editor(tokenizer, tmp_path / "stats")
    editor.edit(subject_final_requests()[:2])
    weights = parameters_snapshot(editor.model)
    editor.stats_dataset = tiny_corpus()[:20]
    editor.args.stats_num_tokens = 5000  # a new provider, other statistics
    with pytest.raises(StateMismatchError, match="holds state accumulated with the statistics"):
        editor.edit(subject_final_requests()[2:])
    assert changed_tensors(editor.model, weights) == []


# ------------------------------------------------------------------------------------------------ trust (issue 21)
def rewrite_state(folder, damage) -> None:
    """Doctor a saved state as an attacker or a broken tool would, keeping its checksums consistent: `damage(tensors,
    manifest)` changes the loaded tensors and manifest in place."""
    from safetensors.torch import save_file

    from memit_hf.files import file_sha256

    data = json.loads((folder / "editor_state.json").read_text())
    tensors_file = folder / data["tensors_file"]
    loaded = load_file(str(tensors_file))
    damage(loaded, data)
    save_file(loaded, str(tensors_file))
    data.setdefault("files", {})[tensors_file.name] = file_sha256(tensors_file)
    (folder / "editor_state.json").write_text(json.dumps(data))


def saved_two_batches(tokenizer, tmp_path):
    editor = make_editor(tokenizer, tmp_path / "stats")
    editor.edit(subject_final_requests()[:2])
    editor.edit(subject_final_requests()[2:])
    editor.save_state(tmp_path / "state")
    return editor


def test_a_state_file_does_not_choose_how_the_model_is_loaded(tokenizer, tmp_path):
    """Point 1: `model_init_kwargs`, the statistics location and the Hub/output settings of a state file are never
    used (before, `from_state(model_id, path)` passed the file's kwargs to `from_pretrained`)."""
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    Editor(model, args=tiny_editing_arguments(tmp_path / "stats", **FLAT), processing_class=tokenizer).save_state(
        tmp_path / "state"
    )

    def hostile(manifest):
        manifest["arguments"].update(
            model_init_kwargs={
                "attn_implementation": "no-such-attention",
                "trust_remote_code": True,
                "revision": "refs/pr/1",
                "code_revision": "refs/pr/1",
                "token": "stolen",
            },
            stats_cache_dir=str(tmp_path / "elsewhere"),
            stats_repo="evil/stats",
            hub_model_id="evil/edits",
            output_dir=str(tmp_path / "evil"),
            push_to_hub=True,
            hub_token="stolen",
        )

    rewrite_state(tmp_path / "state", lambda tensors, manifest: hostile(manifest))
    editor = Editor.from_state(str(tmp_path / "model"), tmp_path / "state")  # the file's kwargs would fail to load
    assert editor.args.model_init_kwargs is None and editor.args.stats_cache_dir is None
    assert editor.args.stats_repo is None and editor.args.hub_model_id is None and editor.args.hub_token is None
    assert editor.args.output_dir is None and editor.args.push_to_hub is False
    assert editor.args.algorithm == "memit_seq" and editor.args.v_num_grad_steps == 8  # the editing settings are kept
    saved = json.loads((tmp_path / "state" / "editor_state.json").read_text())
    assert "model_init_kwargs" in saved["arguments"]  # the doctored file, untouched


def test_the_saved_arguments_hold_no_loading_setting_and_no_secret(tokenizer, tmp_path):
    args = tiny_editing_arguments(
        tmp_path / "stats",
        hub_token="hub-secret-1",
        model_init_kwargs={"token": "secret-2"},
        hub_model_id="me/edits",
        **FLAT,
    )
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    editor = Editor(model, args=args, processing_class=tokenizer, stats_dataset=tiny_corpus())
    editor.edit(subject_final_requests()[:2])
    editor.save_state(tmp_path / "state")
    saved = json.loads((tmp_path / "state" / "editor_state.json").read_text())["arguments"]
    assert not {"model_init_kwargs", "hub_token", "stats_cache_dir", "hub_model_id", "output_dir"} & set(saved)
    for file in (tmp_path / "state").rglob("*"):
        if file.is_file():
            text = file.read_bytes()
            assert b"hub-secret-1" not in text and b"secret-2" not in text, file


@pytest.mark.parametrize(
    "damage, match",
    [
        (
            lambda t, m: t.update({"batches.1.deltas.0.lora_B": t["batches.1.deltas.0.lora_B"] * float("nan")}),
            "batch 1 has non-finite values",
        ),
        (
            lambda t, m: t.update({"batches.1.deltas.0.lora_B": t["batches.1.deltas.0.lora_B"][:-1]}),
            "batch 1 Update factors",
        ),
        (
            lambda t, m: m["batches"][1]["deltas"][0].update(module="model.layers.3.mlp.down_proj"),
            "batch 1 updates `model.layers.3.mlp.down_proj`, which is not among the edited modules",
        ),
        (lambda t, m: m["batches"][1]["requests"][0].update(prompt="no placeholder"), "invalid request"),
        (lambda t, m: m["batches"][1].pop("deltas"), "malformed .*KeyError"),
        (lambda t, m: m.pop("original_weights"), "malformed .*KeyError"),
    ],
)
def test_a_damaged_state_is_refused_before_anything_is_applied(tokenizer, tmp_path, damage, match):
    """Point 3: every factor and request is checked before any is applied (before, batch 0 was applied, then batch
    1's bad request raised with the model half edited; a NaN or a wrong-shaped factor was applied silently), and a
    malformed manifest is a `StateMismatchError`, not a `KeyError`."""
    saved_two_batches(tokenizer, tmp_path)
    rewrite_state(tmp_path / "state", damage)
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    snapshot = parameters_snapshot(model)
    with pytest.raises(StateMismatchError, match=match):
        Editor.from_state(
            model,
            tmp_path / "state",
            args=continue_args(tmp_path),
            processing_class=tokenizer,
            stats_dataset=tiny_corpus(),
        )
    assert changed_tensors(model, snapshot) == []


def test_a_failure_while_applying_a_state_reverts_the_model(tokenizer, tmp_path):
    """Point 3: an exception raised while the batches are applied (here by the method's state) leaves the weights
    bit-identical."""
    saved_two_batches(tokenizer, tmp_path)
    rewrite_state(tmp_path / "state", lambda tensors, manifest: tensors.update({"algorithm.nonsense": torch.zeros(2)}))
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    snapshot = parameters_snapshot(model)
    with pytest.raises(StateMismatchError, match="`nonsense` is not of an edited module"):
        Editor.from_state(
            model,
            tmp_path / "state",
            args=continue_args(tmp_path),
            processing_class=tokenizer,
            stats_dataset=tiny_corpus(),
        )
    assert changed_tensors(model, snapshot) == []


def test_a_tensors_file_changed_behind_the_manifest_is_refused(tokenizer, tmp_path):
    """Point 4: the manifest carries the SHA-256 of the tensors it was written with."""
    from safetensors.torch import save_file

    saved_two_batches(tokenizer, tmp_path)
    manifest = json.loads((tmp_path / "state" / "editor_state.json").read_text())
    tensors_file = tmp_path / "state" / manifest["tensors_file"]
    tensors = load_file(str(tensors_file))
    tensors["batches.0.deltas.0.lora_B"] = tensors["batches.0.deltas.0.lora_B"] * 2
    save_file(tensors, str(tensors_file))
    with pytest.raises(StateMismatchError, match="does not match the manifest's SHA-256"):
        read_state(tmp_path / "state")


def test_another_format_version_is_refused(tokenizer, tmp_path):
    saved_two_batches(tokenizer, tmp_path)
    rewrite_state(tmp_path / "state", lambda tensors, manifest: manifest.update(format_version=99))
    with pytest.raises(StateMismatchError, match="format version 99; this memit-hf reads versions"):
        read_state(tmp_path / "state")


def state_signature(folder):
    """What reading the state back gives: its batches' sizes and a digest of every tensor, or `None` without one."""
    if not is_state_dir(folder):
        return None
    state = read_state(folder)
    tensors = [t for b in state.batches for d in b.deltas for t in (d.lora_A, d.lora_B)]
    return [len(b.requests) for b in state.batches], [float(t.double().sum()) for t in tensors]


def test_an_interrupted_save_reads_back_as_the_old_state_or_the_new_one(tokenizer, tmp_path):
    """Point 4: a save killed before any file operation of its commit leaves a folder that reads back as the state
    before or the state after, never a mix; the next save cleans up after it."""
    editor = make_editor(tokenizer, tmp_path / "stats")
    folder = tmp_path / "state"
    second = subject_final_requests()[2:]
    editor.edit(subject_final_requests()[:2])
    editor.save_state(folder)
    old = state_signature(folder)
    values = editor.edit(second).values
    steps = []
    editor.save_state(folder, on_step=steps.append)
    new = state_signature(folder)
    assert old != new and len(steps) > 10
    assert steps[-2:] == ["move editor_state.json", steps[-1]] and steps[-1].startswith("remove editor_state-")

    class Killed(Exception):
        pass

    for k in range(len(steps)):
        editor.rollback()
        editor.save_state(folder)
        assert state_signature(folder) == old
        editor.edit(second, values=values)
        calls = []

        def kill(step, k=k, calls=calls):
            calls.append(step)
            if len(calls) > k:
                raise Killed(step)

        with pytest.raises(Killed):
            editor.save_state(folder, on_step=kill)
        expected = old if k < len(steps) - 1 else new  # the manifest's move is the commit point
        assert state_signature(folder) == expected, (k, calls[-1])
    editor.save_state(folder)
    assert state_signature(folder) == new
    assert len(list(folder.glob("editor_state-*.safetensors"))) == 1  # the killed generations' files are gone


def test_a_doctored_manifest_cannot_make_a_save_remove_files_outside_the_folder(tokenizer, tmp_path):
    editor = saved_two_batches(tokenizer, tmp_path)
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    listed = [str(outside), "../precious.txt", "batches/../../precious.txt"]
    rewrite_state(tmp_path / "state", lambda tensors, manifest: manifest["files"].update(dict.fromkeys(listed, "0")))
    editor.save_state(tmp_path / "state")
    assert outside.read_text() == "keep me" and read_state(tmp_path / "state").num_edits == 4


def test_save_state_after_rollback_drops_the_undone_batches_adapters(tokenizer, tmp_path):
    """Point 5: `batches/0001` of an undone batch does not survive the next save (stacking `batches/*` re-applied
    it)."""
    editor = saved_two_batches(tokenizer, tmp_path)
    assert (tmp_path / "state" / "batches" / "0001").is_dir()
    editor.rollback()
    editor.save_state(tmp_path / "state")
    assert sorted(p.name for p in (tmp_path / "state" / "batches").iterdir()) == ["0000"]
    metadata = json.loads((tmp_path / "state" / "memit_edits.json").read_text())
    assert [batch["num_requests"] for batch in metadata["batches"]] == [2]
    editor.save_state(tmp_path / "state", save_adapters=False)
    assert not (tmp_path / "state" / "batches").exists() and not (tmp_path / "state" / "adapter_config.json").exists()


def test_state_staging_stays_inside_the_folder(tokenizer, tmp_path, monkeypatch):
    """Point 8: nothing is staged beside the state folder (a mounted volume's parent may not be writable)."""
    import tempfile

    editor = make_editor(tokenizer, tmp_path / "stats")
    editor.edit(subject_final_requests()[:2])
    parent = tmp_path / "volume"
    parent.mkdir()
    real_mkdtemp = tempfile.mkdtemp

    def no_writes_in_parent(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).resolve() == parent.resolve():
            raise PermissionError(13, "Permission denied", str(dir))
        return real_mkdtemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkdtemp", no_writes_in_parent)
    editor.save_state(parent / "state", save_adapters=False)
    assert [p.name for p in parent.iterdir()] == ["state"]
    assert read_state(parent / "state").num_edits == 2


def test_the_state_lock_refuses_a_second_run(tmp_path):
    from memit_hf.editor_state import StateLock, StateLockedError

    with StateLock(tmp_path / "state"):
        with pytest.raises(StateLockedError, match=f"in use by another memit-hf run \\(pid {os.getpid()}"):
            with StateLock(tmp_path / "state"):
                pass
    with StateLock(tmp_path / "state"):  # released
        pass


# ----------------------------------------------------------------------------------------------- keep_history
def test_keep_history_bounds_the_history_and_keeps_rollback_and_state_exact(tokenizer, tmp_path):
    requests = subject_final_requests()
    batches = [requests[:1], requests[1:2], requests[2:3], requests[3:]]
    editor = make_editor(tokenizer, tmp_path / "stats", keep_history=1)
    reference = make_editor(tokenizer, tmp_path / "stats")
    snapshots = []
    for batch in batches:
        values = reference.compute_values(batch)
        reference.edit(batch, values=values)
        editor.edit(batch, values=values)
        snapshots.append(parameters_snapshot(editor.model))
        assert changed_tensors(editor.model, parameters_snapshot(reference.model)) == []  # the same edits
    assert len(editor.history) == 1 and len(editor.edit_metadata()["batches"]) == 4
    assert editor.edit_metadata()["num_edits"] == len(requests)
    with pytest.raises(ValueError, match="3 more are consolidated by `keep_history`"):
        editor.rollback(2)

    # The whole-history adapter still holds every edit (summed exactly, to float error).
    from peft import PeftModel

    editor.save_adapter(tmp_path / "adapter")
    merged = PeftModel.from_pretrained(
        build_tiny_causal_lm("llama", vocab_size=len(tokenizer)), str(tmp_path / "adapter")
    ).merge_and_unload()
    for name, tensor in snapshots[-1].items():
        if "down_proj" in name:
            assert torch.allclose(merged.state_dict()[name], tensor, atol=1e-5), name

    # A saved consolidated state continues bit for bit, and rolls back to the floor exactly.
    editor.save_state(tmp_path / "state")
    assert read_state(tmp_path / "state").num_edits == len(requests)
    fresh = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    continued = Editor.from_state(
        fresh,
        tmp_path / "state",
        args=continue_args(tmp_path, keep_history=1),
        processing_class=tokenizer,
        stats_dataset=tiny_corpus(),
    )
    assert changed_tensors(fresh, snapshots[-1]) == []
    ours, theirs = editor.algorithm.state_dict(), continued.algorithm.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    reference.rollback()
    for held in (editor, continued):
        held.rollback()
        assert changed_tensors(held.model, snapshots[-2]) == []
        gram, expected = held.algorithm.state_dict(), reference.algorithm.state_dict()
        assert all(torch.equal(gram[k], expected[k]) for k in expected)
        held.restore()
    assert changed_tensors(fresh, parameters_snapshot(build_tiny_causal_lm("llama", vocab_size=len(tokenizer)))) == []


def test_keep_history_needs_merged_edits(tokenizer, tmp_path):
    editor = make_editor(tokenizer, tmp_path / "stats", keep_history=0, merge_edits=False)
    with pytest.raises(ValueError, match="`keep_history` consolidates merged edits"):
        editor.edit(subject_final_requests()[:1])


def test_state_and_adapter_files_get_the_permissions_of_the_umask(tokenizer, tmp_path):
    """A state folder, an adapter or a checkpoint shared between users stays readable by them: safetensors (and
    transformers' `save_pretrained`) alone create `0o600` files (before, the state's, the adapters' and the
    checkpoint's tensors were `0o600`)."""
    import stat

    editor = make_editor(tokenizer, tmp_path / "stats")
    editor.edit(subject_final_requests()[:2])
    previous = os.umask(0o022)
    try:
        editor.save_state(tmp_path / "state")
        editor.save_adapter(tmp_path / "adapter")
        editor.merge_and_save(tmp_path / "merged")
    finally:
        os.umask(previous)
    files = [
        *(tmp_path / "state").rglob("*.safetensors"),
        tmp_path / "adapter" / "adapter_model.safetensors",
        *(tmp_path / "merged").glob("*.safetensors"),
    ]
    assert len(files) == 5  # the state's tensors, its adapter, batch 0's adapter, the adapter, the checkpoint
    assert {str(path): stat.S_IMODE(path.stat().st_mode) for path in files} == dict.fromkeys(map(str, files), 0o644)


@pytest.mark.parametrize("method", ["alphaedit", "memit_seq"])
def test_a_state_saved_before_new_method_fields_continues_with_their_old_meaning(method, tokenizer, tmp_path):
    """A state written before AlphaEdit's published rules (no `nullspace_rule`: its threshold and ridge were relative)
    or before `update_norm_weight` existed continues with the settings it was made with, and its next edit equals the
    one an editor that never saved would make."""
    legacy = {"nullspace_threshold": 0.5, "nullspace_rule": "relative", "alphaedit_l2_relative": True}
    flat = {"algorithm": method, "v_num_grad_steps": 3, **(legacy if method == "alphaedit" else {})}
    requests = subject_final_requests()
    editor = make_editor(tokenizer, tmp_path / "stats", **flat)
    editor.edit(requests[:2])
    editor.save_state(tmp_path / "state")

    def drop_new_fields(tensors, manifest):
        new_fields = ("nullspace_rule", "alphaedit_l2_relative", "update_norm_weight")
        for config in (manifest["algorithm_config"], manifest["arguments"]["algorithm_config"]):
            for name in new_fields:
                config.pop(name, None)

    rewrite_state(tmp_path / "state", drop_new_fields)
    assert (
        "nullspace_rule" not in json.loads((tmp_path / "state" / "editor_state.json").read_text())["algorithm_config"]
    )
    continued = Editor.from_state(
        build_tiny_causal_lm("llama", vocab_size=len(tokenizer)),
        tmp_path / "state",
        processing_class=tokenizer,
        stats_dataset=tiny_corpus(),
        args=continue_args(tmp_path, **flat),
    )
    assert continued.resolved_args.algorithm_config == editor.resolved_args.algorithm_config
    expected, actual = editor.edit(requests[2:]), continued.edit(requests[2:])
    for a, b in zip(expected.deltas, actual.deltas):
        assert torch.equal(a.lora_B, b.lora_B) and torch.equal(a.lora_A, b.lora_A)
