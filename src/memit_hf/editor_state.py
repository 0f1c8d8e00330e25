"""The persisted state of a sequence of edits: a folder that another process continues from.

A state folder holds two files:

- `editor_state.json`, the manifest: the base model's identity and a digest of the original weights of every edited
  module, the method and its configuration, the editing arguments, the context templates, the statistics fingerprint
  of every edited module, and the ordered list of applied batches (their requests, metrics and metadata);
- `editor_state.safetensors`: the exact update factors of every batch, the Gram factors each batch added to the
  method's state (what [`~memit_hf.algorithms.EditAlgorithm.replay`] rebuilds the state from, for `rollback`), and
  the method's committed state (the accumulated key Gram per layer: constant size in the number of edits).

[`~memit_hf.Editor.save_state`] writes it (next to the whole history as one adapter and one adapter per batch) and
[`~memit_hf.Editor.from_state`] reads it back after checking that it was made for this model and these statistics.
"""

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .deltas import LayerDelta


STATE_FORMAT_VERSION = 1
STATE_MANIFEST_NAME = "editor_state.json"
STATE_TENSORS_NAME = "editor_state.safetensors"
BATCH_ADAPTERS_DIR = "batches"

IDENTITY_FIELDS = ("model_type", "num_parameters", "dtype", "embedding_digest")
"""The fields of the base model's identity that must match for a state to be loaded."""


class StateMismatchError(ValueError):
    """Raised when a saved editor state does not belong to the model, statistics or arguments at hand."""


@dataclass
class SavedBatch:
    """One applied `edit()` call of a saved state.

    Args:
        deltas (`list[LayerDelta]`): its exact update factors, in the order they were applied.
        increments (`list[tuple[str, str, torch.Tensor]]`): the Gram factors it added to the method's state.
        metadata (`dict`): its entry in the exported edit metadata (algorithm, layers, statistics, metrics, ...).
        requests (`list[dict]`): its requests, every field.
    """

    deltas: list[LayerDelta]
    increments: list[tuple[str, str, torch.Tensor]]
    metadata: dict[str, Any]
    requests: list[dict[str, Any]]


@dataclass
class EditorState:
    """Everything [`~memit_hf.Editor.from_state`] needs to continue a sequence of edits.

    Args:
        model (`dict`): the base model's identity (see [`~memit_hf.Editor.edit_metadata`]).
        original_weights (`dict[str, str]`): per edited module, a digest of its weight before the first edit.
        algorithm (`str`): the method.
        algorithm_config (`dict`): its configuration.
        arguments (`dict`): the editing arguments (`EditingArguments.to_dict()`).
        context_templates (`list[list[str]]`): the context templates of the z optimisation and the keys.
        statistics (`dict[str, str]`): per edited module, the fingerprint key of the statistics the edits used.
        batches (`list[SavedBatch]`): the applied batches, in order.
        algorithm_state (`dict[str, torch.Tensor]`): the method's committed state (`EditAlgorithm.state_dict()`).
        memit_hf_version (`str`): the library version that wrote the state.
    """

    model: dict[str, Any]
    original_weights: dict[str, str]
    algorithm: str
    algorithm_config: dict[str, Any]
    arguments: dict[str, Any]
    context_templates: list[list[str]]
    statistics: dict[str, str]
    batches: list[SavedBatch] = field(default_factory=list)
    algorithm_state: dict[str, torch.Tensor] = field(default_factory=dict)
    memit_hf_version: str = ""

    @property
    def num_edits(self) -> int:
        return sum(len(batch.requests) for batch in self.batches)


def is_state_dir(path: str | os.PathLike) -> bool:
    """Whether `path` holds a saved editor state."""
    return (Path(path) / STATE_MANIFEST_NAME).is_file()


def write_state(state: EditorState, path: str | os.PathLike) -> None:
    """Write `state` to the folder `path` (created; other files in it are kept). The two files are written to a
    temporary sibling folder and moved in, the manifest last, so a reader never sees a half-written state.

    Args:
        state ([`EditorState`]): what to write.
        path (`str` or `os.PathLike`): the state folder.
    """
    from . import __version__
    from .export import write_json

    tensors: dict[str, torch.Tensor] = {}
    batches = []
    for i, batch in enumerate(state.batches):
        deltas = []
        for j, delta in enumerate(batch.deltas):
            tensors[f"batches.{i}.deltas.{j}.lora_B"] = delta.lora_B.detach().cpu().contiguous()
            tensors[f"batches.{i}.deltas.{j}.lora_A"] = delta.lora_A.detach().cpu().contiguous()
            deltas.append({"module": delta.module_name, "fan_in_fan_out": delta.fan_in_fan_out})
        increments = []
        for j, (module, key, factor) in enumerate(batch.increments):
            tensors[f"batches.{i}.increments.{j}"] = factor.detach().cpu().contiguous()
            increments.append({"module": module, "key": key})
        batches.append({"deltas": deltas, "increments": increments, "metadata": batch.metadata,
                        "requests": batch.requests})  # fmt: skip
    for name, tensor in state.algorithm_state.items():
        tensors[f"algorithm.{name}"] = tensor.detach().cpu().contiguous()
    manifest = {
        "format_version": STATE_FORMAT_VERSION,
        "memit_hf_version": __version__,
        "model": state.model,
        "original_weights": state.original_weights,
        "algorithm": state.algorithm,
        "algorithm_config": state.algorithm_config,
        "arguments": state.arguments,
        "context_templates": state.context_templates,
        "statistics": state.statistics,
        "num_edits": state.num_edits,
        "batches": batches,
    }
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.state.", dir=path.parent))
    try:
        save_file(tensors, str(staging / STATE_TENSORS_NAME), metadata={"format": "pt"})
        write_json(staging / STATE_MANIFEST_NAME, manifest)
        for name in (STATE_TENSORS_NAME, STATE_MANIFEST_NAME):
            os.replace(staging / name, path / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_state(path: str | os.PathLike) -> EditorState:
    """Read the state folder written by [`write_state`].

    Raises:
        FileNotFoundError: when `path` holds no state.
        StateMismatchError: for a state of a newer format than this version reads.
    """
    import json

    path = Path(path)
    if not is_state_dir(path):
        raise FileNotFoundError(f"No editor state in `{path}` (expected `{STATE_MANIFEST_NAME}`).")
    manifest = json.loads((path / STATE_MANIFEST_NAME).read_text(encoding="utf-8"))
    version = manifest.get("format_version")
    if version != STATE_FORMAT_VERSION:
        raise StateMismatchError(
            f"The editor state in `{path}` has format version {version}; this memit-hf reads version "
            f"{STATE_FORMAT_VERSION} (it was written by memit-hf {manifest.get('memit_hf_version')})."
        )
    tensors = load_file(str(path / STATE_TENSORS_NAME)) if (path / STATE_TENSORS_NAME).is_file() else {}
    batches = []
    for i, batch in enumerate(manifest["batches"]):
        deltas = [
            LayerDelta(
                entry["module"],
                tensors[f"batches.{i}.deltas.{j}.lora_B"],
                tensors[f"batches.{i}.deltas.{j}.lora_A"],
                entry["fan_in_fan_out"],
            )  # fmt: skip
            for j, entry in enumerate(batch["deltas"])
        ]
        increments = [
            (entry["module"], entry["key"], tensors[f"batches.{i}.increments.{j}"])
            for j, entry in enumerate(batch["increments"])
        ]
        batches.append(SavedBatch(deltas, increments, batch["metadata"], batch["requests"]))
    prefix = "algorithm."
    algorithm_state = {name[len(prefix) :]: t for name, t in tensors.items() if name.startswith(prefix)}
    return EditorState(
        model=manifest["model"],
        original_weights=manifest["original_weights"],
        algorithm=manifest["algorithm"],
        algorithm_config=manifest["algorithm_config"],
        arguments=manifest["arguments"],
        context_templates=manifest["context_templates"],
        statistics=manifest["statistics"],
        batches=batches,
        algorithm_state=algorithm_state,
        memit_hf_version=manifest.get("memit_hf_version", ""),
    )


def check_model(state: EditorState, model_info: dict[str, Any], original_weights: dict[str, str], where: str) -> None:
    """Refuse a state made for another base model, or a model whose edited modules no longer hold their original
    weights.

    Args:
        state ([`EditorState`]): the saved state.
        model_info (`dict`): the identity of the model at hand (same fields as `state.model`).
        original_weights (`dict[str, str]`): digests of the model's current weights of the state's edited modules.
        where (`str`): the state's folder, for messages.

    Raises:
        StateMismatchError: naming what differs.
    """
    differing = [name for name in IDENTITY_FIELDS if state.model.get(name) != model_info.get(name)]
    if differing:
        details = ", ".join(f"{name} {state.model.get(name)!r} vs {model_info.get(name)!r}" for name in differing)
        raise StateMismatchError(
            f"The editor state in `{where}` was made for another model "
            f"(`{state.model.get('base_model_name_or_path')}`): {details}. Load the base model it was made on."
        )
    for module, digest in state.original_weights.items():
        if original_weights.get(module) != digest:
            raise StateMismatchError(
                f"The weight of `{module}` differs from the one the editor state in `{where}` was made on. Load the "
                "original base model (not a merged or already edited checkpoint)."
            )


def check_statistics(state: EditorState, keys: dict[str, str], where: str) -> None:
    """Refuse to continue a state with other statistics than the ones its edits used.

    Args:
        state ([`EditorState`]): the saved state.
        keys (`dict[str, str]`): the fingerprint keys of the statistics at hand, by module.
        where (`str`): the state's folder, for messages.

    Raises:
        StateMismatchError: naming the module and both keys.
    """
    for module, key in state.statistics.items():
        if keys.get(module) != key:
            raise StateMismatchError(
                f"The statistics of `{module}` (key {keys.get(module)}) are not those the editor state in `{where}` "
                f"was made with (key {key}): pass the same `stats_dataset` and `stats_*` arguments."
            )
