"""The persisted state of a sequence of edits: a folder that another process continues from.

A state folder holds:

- `editor_state.json`, the manifest: the base model's identity and a digest of the original weights of every edited
  module, the method and its configuration, the editing hyperparameters (never loading, statistics-location or Hub
  settings, and no secret), the context templates, the statistics fingerprint of every edited module, the ordered
  list of applied batches (their requests, metrics and metadata), and the SHA-256 of every other file of the state;
- `editor_state-<generation>.safetensors`: the exact update factors of every batch, the Gram factors each batch added
  to the method's state (what [`~memit_hf.algorithms.EditAlgorithm.replay`] rebuilds the state from, for
  `rollback`), and the method's committed state (the accumulated key Gram per layer);
- the exported adapters ([`~memit_hf.Editor.save_state`]): the whole history at the top level, one per batch in
  `batches/NNNN`.

The folder is written as one transaction ([`write_state`]): everything is staged in `.staging-*` inside the folder,
moved in, and the manifest replaced last. The manifest is the commit point and the tensors of each generation have
their own file, so a reader sees the old state or the new one, never a mix, whenever the writer is killed.
[`StateLock`] keeps a second run off a folder that a run is using (`memit-hf edit --state-dir` holds it for the whole
load-edit-save cycle).

A state folder is trusted input for the edits it holds: [`~memit_hf.Editor.from_state`] validates every factor
(module, shape, finite values) and request before applying anything, but the edits themselves are whatever the
folder says. It never decides how the model is loaded or where anything is published.
"""

import errno
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .algorithms import ALGORITHM_NAMES, get_algorithm, get_config_class
from .arguments import EditingArguments
from .callbacks import EditorCallback
from .deltas import LayerDelta, make_delta
from .distributed import on_main_process
from .editor_export import output_folder
from .export import ExportReport, edit_metadata, save_adapter_files, write_edit_adapter
from .files import entry_lock, file_sha256, save_tensors
from .history import BatchRecord, EditHistory, EditOutput, HistoryFloor, StateMismatchError
from .requests import load_requests
from .statistics import fingerprint_key, legacy_fingerprint_key, tensor_digest
from .weights import read_parameter


logger = logging.getLogger(__name__)

STATE_FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)
"""Format 1 (before the transactional folder) is still read; it carries no checksums."""
STATE_MANIFEST_NAME = "editor_state.json"
STATE_TENSORS_NAME = "editor_state.safetensors"
"""The tensors file of format 1; format 2 names one per generation (`editor_state-<generation>.safetensors`)."""
TENSORS_FILE_PATTERN = re.compile(r"^editor_state(-[0-9a-f]+)?\.safetensors$")
BATCH_ADAPTERS_DIR = "batches"
LOCK_NAME = ".memit-hf.lock"
"""The lock file of a run that uses the folder ([`StateLock`])."""
COMMIT_LOCK_NAME = ".memit-hf-commit.lock"
"""The lock file held while a write moves its files in (two writers never interleave their moves)."""

IDENTITY_FIELDS = ("model_type", "num_parameters", "dtype", "embedding_digest")
"""The fields of the base model's identity that must match for a state to be loaded."""


class StateLockedError(RuntimeError):
    """Raised when another run holds the lock of a state folder."""


@dataclass
class SavedBatch:
    """One applied `edit()` call of a saved state.

    Args:
        deltas (`list[LayerDelta]`): its exact update factors, in the order they were applied.
        increments (`list[tuple[str, str, torch.Tensor]]`): the Gram factors it added to the method's state.
        record ([`~memit_hf.history.BatchRecord`]): its entry in the exported edit metadata (algorithm, layers,
            statistics, metrics, ...).
        requests (`list[dict]`): its requests, every field.
    """

    deltas: list[LayerDelta]
    increments: list[tuple[str, str, torch.Tensor]]
    record: BatchRecord
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
        floor ([`HistoryFloor`], *optional*): with `keep_history`, the batches consolidated before `batches`.
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
    floor: "HistoryFloor | None" = None

    @property
    def num_edits(self) -> int:
        return sum(len(batch.requests) for batch in self.batches) + (self.floor.num_edits if self.floor else 0)


def is_state_dir(path: str | os.PathLike) -> bool:
    """Whether `path` holds a saved editor state."""
    return (Path(path) / STATE_MANIFEST_NAME).is_file()


@contextmanager
def _exclusive_or_refuse(file: Path) -> Iterator[Any]:
    """Hold `flock(LOCK_EX | LOCK_NB)` on `file` (kept: it names the holder); `BlockingIOError` when another
    process holds it. Nothing is held where `fcntl` does not exist."""
    try:
        import fcntl
    except ImportError:  # no advisory locks (Windows): nothing to hold
        yield None
        return
    handle = open(file, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        handle.close()
        if error.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise BlockingIOError(str(file)) from error
        raise
    try:
        yield handle
    finally:
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        handle.close()


class StateLock:
    """An exclusive lock on a state folder for a whole load-edit-save cycle (advisory `flock` on
    `<folder>/.memit-hf.lock`; released when the process ends, even when killed).

    Args:
        path (`str` or `os.PathLike`): the state folder (created if needed).

    Raises:
        StateLockedError: on entering, when another run holds the lock (the message names its process).

    Example:

    ```python
    >>> with StateLock("state"):
    ...     editor = Editor.from_state(model, "state") if is_state_dir("state") else Editor(model)
    ...     editor.edit(requests)
    ...     editor.save_state("state")
    ```
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._context = None

    def __enter__(self) -> "StateLock":
        self.path.mkdir(parents=True, exist_ok=True)
        file = self.path / LOCK_NAME
        context = _exclusive_or_refuse(file)
        try:
            handle = context.__enter__()
        except BlockingIOError:
            holder = file.read_text(encoding="utf-8").strip() if file.exists() else ""
            raise StateLockedError(
                f"The state folder `{self.path}` is in use by another memit-hf run ({holder or 'unknown process'}); "
                "wait for it to finish. Two runs on one state would edit from the same state and lose one batch."
            ) from None
        if handle is not None:
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            handle.flush()
        self._context = context
        return self

    def __exit__(self, *exc: Any) -> None:
        context, self._context = self._context, None
        if context is not None:
            context.__exit__(*exc)


def state_tensors(state: EditorState) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]], dict[str, Any] | None]:
    """The tensors of the state's safetensors file, the batches' manifest entries and the floor's."""
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
        entry = {"deltas": deltas, "increments": increments, "metadata": batch.record.to_dict()}
        batches.append({**entry, "requests": batch.requests})
    for name, tensor in state.algorithm_state.items():
        tensors[f"algorithm.{name}"] = tensor.detach().cpu().contiguous()
    floor = None
    if state.floor is not None:
        for name, tensor in state.floor.weights.items():
            tensors[f"floor.weights.{name}"] = tensor.detach().cpu().contiguous()
        for name, tensor in state.floor.algorithm_state.items():
            tensors[f"floor.algorithm.{name}"] = tensor.detach().cpu().contiguous()
        for j, delta in enumerate(state.floor.deltas):
            tensors[f"floor.deltas.{j}.lora_B"] = delta.lora_B.detach().cpu().contiguous()
            tensors[f"floor.deltas.{j}.lora_A"] = delta.lora_A.detach().cpu().contiguous()
        deltas = [
            {"module": delta.module_name, "fan_in_fan_out": delta.fan_in_fan_out} for delta in state.floor.deltas
        ]
        floor = {"batches": [record.to_dict() for record in state.floor.batches], "deltas": deltas}
    return tensors, batches, floor


def write_state(
    state: EditorState,
    path: str | os.PathLike,
    write_exports: Callable[[Path], None] | None = None,
    on_step: Callable[[str], None] | None = None,
) -> None:
    """Write `state` to the folder `path` as one transaction: a reader sees the state that was there before or this
    one, never a mix, wherever the write stops.

    Everything is written to a staging folder inside `path` first: the tensors (under a name of their own, so the
    previous generation's stay until the switch), the exports of `write_exports`, then the manifest with the SHA-256
    of every file. Then, holding the folder's commit lock, the files are moved in, the batch folders of the previous
    state that this one does not have are removed (a rolled-back batch's adapter does not survive), the manifest is
    replaced last (the commit point), and the previous generation's files that this one does not list are removed.
    Files in `path` that no state wrote are left alone.

    Args:
        state ([`EditorState`]): what to write.
        path (`str` or `os.PathLike`): the state folder (created).
        write_exports (`Callable[[Path], None]`, *optional*): writes further files of the state (the adapters) into
            the staging folder it is given, laid out as they go into `path`.
        on_step (`Callable[[str], None]`, *optional*): called with a description before each file operation of the
            commit (a seam to test interrupted writes).
    """
    from .export import staging_folder, write_json
    from .version import __version__

    step = on_step or (lambda what: None)
    path = Path(path)
    with staging_folder(path) as staging:
        tensors, batches, floor = state_tensors(state)
        generation = f"{int(time.time() * 1000):x}{uuid.uuid4().hex[:8]}"
        tensors_name = f"editor_state-{generation}.safetensors"
        save_tensors(tensors, staging / tensors_name, metadata={"format": "pt"})
        if write_exports is not None:
            write_exports(staging)
        files = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
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
            "floor": floor,
            "tensors_file": tensors_name,
            "files": {name: file_sha256(staging / name) for name in files},
        }
        write_json(staging / STATE_MANIFEST_NAME, manifest)
        with entry_lock(path / COMMIT_LOCK_NAME):
            previous = previous_files(path)
            for name in files:
                step(f"move {name}")
                target = path / name
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging / name, target)
            kept_batches = {name.split("/")[1] for name in files if name.startswith(f"{BATCH_ADAPTERS_DIR}/")}
            for folder in (
                sorted((path / BATCH_ADAPTERS_DIR).glob("*")) if (path / BATCH_ADAPTERS_DIR).is_dir() else []
            ):
                if folder.is_dir() and folder.name not in kept_batches and re.fullmatch(r"\d{4,}", folder.name):
                    step(f"remove {BATCH_ADAPTERS_DIR}/{folder.name}")
                    shutil.rmtree(folder)
            step(f"move {STATE_MANIFEST_NAME}")
            os.replace(staging / STATE_MANIFEST_NAME, path / STATE_MANIFEST_NAME)
            for name in sorted(previous - set(files)):
                stale = path / name
                if stale.is_file():
                    step(f"remove {name}")
                    stale.unlink()
            if not any(f.startswith(f"{BATCH_ADAPTERS_DIR}/") for f in files) and (path / BATCH_ADAPTERS_DIR).is_dir():
                if not any((path / BATCH_ADAPTERS_DIR).iterdir()):
                    (path / BATCH_ADAPTERS_DIR).rmdir()


def is_inside(name: Any) -> bool:
    """Whether `name` (from a manifest, which may be doctored) is a relative path that stays inside its folder."""
    if not isinstance(name, str) or not name or "\\" in name:
        return False
    relative = Path(name)
    return not relative.is_absolute() and ".." not in relative.parts and not re.match(r"^[A-Za-z]:", name)


def previous_files(path: Path) -> set[str]:
    """The files of the state now in `path` (as its manifest lists them), with every tensors file of any generation
    (a generation whose write was interrupted before its manifest landed is garbage too)."""
    names = {p.name for p in path.glob("*.safetensors") if TENSORS_FILE_PATTERN.match(p.name)}
    try:
        manifest = json.loads((path / STATE_MANIFEST_NAME).read_text(encoding="utf-8"))
        listed = manifest.get("files") if isinstance(manifest, dict) else None
        if isinstance(listed, dict):
            names |= {name for name in listed if is_inside(name)}
    except (OSError, ValueError):
        pass
    return names


def read_state(path: str | os.PathLike) -> EditorState:
    """Read the state folder written by [`write_state`].

    Raises:
        FileNotFoundError: when `path` holds no state.
        StateMismatchError: for a state of another format version, a tensors file whose SHA-256 differs from the
            manifest's, or a malformed manifest (naming what is wrong).
    """
    path = Path(path)
    if not is_state_dir(path):
        raise FileNotFoundError(f"No editor state in `{path}` (expected `{STATE_MANIFEST_NAME}`).")
    try:
        manifest = json.loads((path / STATE_MANIFEST_NAME).read_text(encoding="utf-8"))
    except ValueError as error:
        raise StateMismatchError(f"The editor state manifest in `{path}` is not valid JSON: {error}.") from error
    if not isinstance(manifest, dict):
        raise StateMismatchError(f"The editor state manifest in `{path}` is not a JSON object.")
    version = manifest.get("format_version")
    if version not in READABLE_FORMAT_VERSIONS:
        raise StateMismatchError(
            f"The editor state in `{path}` has format version {version}; this memit-hf reads versions "
            f"{list(READABLE_FORMAT_VERSIONS)} (it was written by memit-hf {manifest.get('memit_hf_version')})."
        )
    try:
        return _state_from_manifest(path, manifest)
    except StateMismatchError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as error:
        raise StateMismatchError(
            f"The editor state in `{path}` is malformed ({type(error).__name__}: {error}); it cannot be continued."
        ) from error


def batch_record(values: Any, what: str) -> BatchRecord:
    """The [`~memit_hf.history.BatchRecord`] of a manifest entry.

    Raises:
        StateMismatchError: when the entry is malformed (naming `what`).
    """
    try:
        return BatchRecord.from_dict(values)
    except (TypeError, ValueError) as error:
        raise StateMismatchError(f"{what} has malformed metadata: {error}") from error


def _state_from_manifest(path: Path, manifest: dict[str, Any]) -> EditorState:
    tensors_name = manifest.get("tensors_file", STATE_TENSORS_NAME)
    if not isinstance(tensors_name, str) or not TENSORS_FILE_PATTERN.match(tensors_name):
        raise StateMismatchError(f"The editor state in `{path}` names a tensors file {tensors_name!r}.")
    tensors_path = path / tensors_name
    expected = (manifest.get("files") or {}).get(tensors_name) if manifest["format_version"] >= 2 else None
    if manifest["format_version"] >= 2 and not tensors_path.is_file():
        raise StateMismatchError(f"The editor state in `{path}` lacks its tensors file `{tensors_name}`.")
    if expected is not None and file_sha256(tensors_path) != expected:
        raise StateMismatchError(
            f"The tensors file `{tensors_name}` of the editor state in `{path}` does not match the manifest's "
            "SHA-256: the folder was changed by something other than memit-hf."
        )
    tensors = load_file(str(tensors_path)) if tensors_path.is_file() else {}

    def tensor(name: str) -> torch.Tensor:
        if name not in tensors:
            raise StateMismatchError(f"The editor state in `{path}` lacks the tensor `{name}`.")
        return tensors[name]

    def deltas_of(entries: list[dict[str, Any]], prefix: str) -> list[LayerDelta]:
        return [
            LayerDelta(
                str(entry["module"]),
                tensor(f"{prefix}.{j}.lora_B"),
                tensor(f"{prefix}.{j}.lora_A"),
                bool(entry["fan_in_fan_out"]),
            )
            for j, entry in enumerate(entries)
        ]

    batches = []
    for i, batch in enumerate(manifest["batches"]):
        deltas = deltas_of(batch["deltas"], f"batches.{i}.deltas")
        increments = [
            (str(entry["module"]), str(entry["key"]), tensor(f"batches.{i}.increments.{j}"))
            for j, entry in enumerate(batch["increments"])
        ]
        if not isinstance(batch["requests"], list):
            raise StateMismatchError(f"Batch {i} of the editor state in `{path}` has malformed requests.")
        record = batch_record(batch["metadata"], f"Batch {i} of the editor state in `{path}`")
        batches.append(SavedBatch(deltas, increments, record, batch["requests"]))

    def prefixed(prefix: str) -> dict[str, torch.Tensor]:
        return {name[len(prefix) :]: t for name, t in tensors.items() if name.startswith(prefix)}

    for name in ("model", "original_weights", "algorithm_config", "arguments", "statistics"):
        if not isinstance(manifest[name], dict):
            raise StateMismatchError(f"Field `{name}` of the editor state in `{path}` is not a mapping.")
    floor = None
    if manifest.get("floor") is not None:
        entry = manifest["floor"]
        floor_deltas = deltas_of(entry["deltas"], "floor.deltas")
        if not isinstance(entry["batches"], list):
            raise StateMismatchError(f"The consolidated batches of the editor state in `{path}` are malformed.")
        records = [batch_record(b, f"A consolidated batch of the editor state in `{path}`") for b in entry["batches"]]
        floor = HistoryFloor(prefixed("floor.weights."), prefixed("floor.algorithm."), floor_deltas, records)
    algorithm = str(manifest["algorithm"])
    algorithm_config, arguments = manifest["algorithm_config"], manifest["arguments"]
    if algorithm in ALGORITHM_NAMES:  # an unknown method is refused later, naming it
        upgrade = get_config_class(algorithm).upgrade_saved
        algorithm_config = upgrade(algorithm_config)
        if isinstance(arguments.get("algorithm_config"), dict):
            arguments = arguments | {"algorithm_config": upgrade(arguments["algorithm_config"])}
    return EditorState(
        model=manifest["model"],
        original_weights=manifest["original_weights"],
        algorithm=algorithm,
        algorithm_config=algorithm_config,
        arguments=arguments,
        context_templates=[[str(t) for t in group] for group in manifest["context_templates"]],
        statistics=manifest["statistics"],
        batches=batches,
        algorithm_state=prefixed("algorithm."),
        memit_hf_version=manifest.get("memit_hf_version", ""),
        floor=floor,
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


def check_statistics(
    state: EditorState, keys: dict[str, str], where: str, legacy_keys: dict[str, str] | None = None
) -> None:
    """Refuse to continue a state with other statistics than the ones its edits used.

    Args:
        state ([`EditorState`]): the saved state.
        keys (`dict[str, str]`): the fingerprint keys of the statistics at hand, by module.
        where (`str`): the state's folder, for messages.
        legacy_keys (`dict[str, str]`, *optional*): their keys as earlier versions wrote them in states, by module
            (see [`~memit_hf.statistics.legacy_fingerprint_key`]), accepted too.

    Raises:
        StateMismatchError: naming the module and both keys.
    """
    legacy_keys = legacy_keys or {}
    for module, key in state.statistics.items():
        if key not in (keys.get(module), legacy_keys.get(module)) or key is None:
            raise StateMismatchError(
                f"The statistics of `{module}` (key {keys.get(module)}) are not those the editor state in `{where}` "
                f"was made with (key {key}): pass the same `stats_dataset` and `stats_*` arguments."
            )


def check_state_content(state: EditorState, model: torch.nn.Module, edited: set[str], where: str) -> None:
    """Check every tensor of `state` against `model` before anything is applied: each update is of a module among
    the `edited` ones, shaped for it (the same check as a fresh update, [`~memit_hf.deltas.make_delta`]) and finite;
    each Gram factor and state tensor names an edited module and is finite; a consolidated floor's weights have their
    module's shape and dtype.

    Args:
        state ([`EditorState`]): the saved state.
        model (`torch.nn.Module`): the model it is about to be applied to.
        edited (`set[str]`): the names of the modules the state's layers edit.
        where (`str`): the state's folder, for messages.

    Raises:
        StateMismatchError: naming the batch, the module and what is wrong.
    """

    def refuse(what: str, reason: str) -> None:
        raise StateMismatchError(f"The editor state in `{where}` is refused: {what} {reason}.")

    def check_delta(delta: LayerDelta, what: str) -> None:
        if delta.module_name not in edited:
            refuse(what, f"updates `{delta.module_name}`, which is not among the edited modules {sorted(edited)}")
        try:
            checked = make_delta(delta.module_name, model.get_submodule(delta.module_name), delta.lora_B, delta.lora_A)
        except (ValueError, AttributeError) as error:
            refuse(what, str(error))
        if checked.fan_in_fan_out != delta.fan_in_fan_out:
            refuse(what, f"has `fan_in_fan_out={delta.fan_in_fan_out}` for `{delta.module_name}`")
        if not (torch.isfinite(delta.lora_B).all() and torch.isfinite(delta.lora_A).all()):
            refuse(what, f"has non-finite values in its update of `{delta.module_name}`")

    def module_of(name: str) -> str:
        return name.rpartition("::")[0] or name

    floor = state.floor
    for j, delta in enumerate(floor.deltas if floor else []):
        check_delta(delta, f"consolidated update {j}")
    for name, weight in (floor.weights if floor else {}).items():
        if name not in edited:
            refuse("the consolidated weights", f"include `{name}`, which is not among the edited modules")
        current = read_parameter(model.get_submodule(name))
        if weight.shape != current.shape or weight.dtype != current.dtype or not torch.isfinite(weight).all():
            refuse("the consolidated weights", f"of `{name}` are {tuple(weight.shape)} {weight.dtype} or not finite")
    for i, batch in enumerate(state.batches):
        for delta in batch.deltas:
            check_delta(delta, f"batch {i}")
        for module, _, factor in batch.increments:
            if module not in edited or factor.ndim != 2 or not torch.isfinite(factor).all():
                refuse(f"batch {i}", f"has a malformed or non-finite Gram factor of `{module}`")
    for name, tensor in [*state.algorithm_state.items(), *((floor.algorithm_state if floor else {}).items())]:
        if module_of(name) not in edited or not torch.isfinite(tensor).all():
            refuse("the method's state", f"entry `{name}` is not of an edited module or not finite")


def saved_layers(state: EditorState) -> list[int]:
    """Every layer the batches of `state` (consolidated ones included) edited, ascending."""
    records = [*(state.floor.batches if state.floor else []), *(batch.record for batch in state.batches)]
    return sorted({layer for record in records for layer in record.layers})


def check_arguments(
    state: EditorState, algorithm: str, algorithm_config: dict[str, Any], layers: list[int], merge: bool, where: str
) -> None:
    """Refuse to continue `state` with another method, configuration or layers, or a consolidated state without
    merged edits.

    Raises:
        StateMismatchError: saying what the state holds and what the arguments say.
    """
    saved = state.arguments.get("layers")
    if (algorithm, algorithm_config, layers) != (state.algorithm, state.algorithm_config, saved):
        raise StateMismatchError(
            f"The editor state in `{where}` holds `{state.algorithm}` {state.algorithm_config} at layers {saved}, "
            f"but `args` say `{algorithm}` {algorithm_config} at layers {layers}."
        )
    if state.floor is not None and not merge:
        raise StateMismatchError(f"The editor state in `{where}` is consolidated; continue it with `merge_edits`.")


def write_history_adapters(
    folder: Path,
    history: EditHistory,
    model_info: dict[str, Any],
    include_requests: bool = True,
    base_model_name_or_path: str | None = None,
) -> ExportReport | None:
    """Write what a state folder exports: the whole `history` as one adapter at the top of `folder` and every batch
    not consolidated as its own adapter in `batches/NNNN` (numbered after the consolidated ones).

    Args:
        folder (`Path`): the (staging) state folder.
        history ([`~memit_hf.history.EditHistory`]): the edits.
        model_info (`dict`): the base model's identity (see [`~memit_hf.Editor.edit_metadata`]).
        include_requests (`bool`, *optional*, defaults to `True`): list the requests in the adapters' metadata.
        base_model_name_or_path (`str`, *optional*): the base model's Hub id to record.

    Returns:
        [`~memit_hf.export.ExportReport`] of the whole-history adapter (`None` when the history is empty).
    """
    records = [record.to_dict() for record in history.records()]
    if not records:
        return None
    metadata = edit_metadata(model_info, records, include_requests, base_model_name_or_path)
    report = write_edit_adapter(history.held_deltas(), folder, metadata)
    offset = len(history.floor.batches) if history.floor else 0
    base = metadata["base_model_name_or_path"]
    for i, batch in enumerate(history.batches):  # named like the whole-history adapter (warned once)
        one = edit_metadata(model_info, [batch.record.to_dict()], include_requests, base)
        path = folder / BATCH_ADAPTERS_DIR / f"{offset + i:04d}"
        save_adapter_files(batch.deltas, path, base, one.get("base_model_revision"), metadata=one)
    return report


EditorType = TypeVar("EditorType", bound="EditorStateMixin")


class EditorStateMixin:
    """`editor_state`, `save_state`, `from_state` and `load_state` of the [`~memit_hf.Editor`]: a sequence of edits
    saved to a state folder and continued from it.

    It reads the editor's `args`, `resolved_args`, `model`, `layout`, `state` (the process state), `statistics`,
    `context_templates`, `edit_history` and `base_model_info`.
    """

    def _original_weight_digests(self, names: list[str]) -> dict[str, str]:
        """Digests of the weights of `names` before the first edit."""
        pristine = self.edit_history.applied.pristine
        return {
            name: tensor_digest(pristine[name] if name in pristine else read_parameter(self.model.get_submodule(name)))
            for name in names
        }

    def editor_state(self) -> EditorState:
        """The state of this sequence of edits (what [`save_state`] writes). Its arguments are the editing
        hyperparameters alone (no loading, statistics-location or Hub setting, every secret redacted)."""
        args, history = self.resolved_args, self.edit_history
        names = sorted({self.layout.edit_name(layer) for layer in args.layers} | set(history.applied.pristine))
        statistics = {name: info["key"] for record in history.records() for name, info in record.statistics.items()}
        batches = [
            SavedBatch(batch.deltas, batch.state_increments, batch.record, [r.to_dict() for r in batch.requests])
            for batch in history.batches
        ]
        return EditorState(
            model=self.base_model_info,
            original_weights=self._original_weight_digests(names),
            algorithm=args.algorithm,
            algorithm_config=args.algorithm_config,
            arguments=args.editing_values(),
            context_templates=self.context_templates,
            statistics=statistics,
            batches=batches,
            algorithm_state=history.algorithm.state_dict() if history.algorithm is not None else {},
            floor=history.floor,
        )

    def save_state(
        self,
        path: str | Path | None = None,
        save_adapters: bool = True,
        include_requests: bool = True,
        base_model_name_or_path: str | None = None,
        on_step: Callable[[str], None] | None = None,
    ) -> ExportReport | None:
        """Save this sequence of edits so that another process continues it with [`from_state`].

        The folder gets `editor_state.json` (the manifest) and the state's tensors (the exact factors of every
        batch, the method's accumulated state and what [`rollback`] needs), and with `save_adapters` the whole
        history as one peft adapter at its top level (`PeftModel.from_pretrained(base, path)` loads it; its model
        card lists the batches in order) and every batch as its own adapter in `batches/0000`, `batches/0001`, ...
        (stack or toggle them with peft). The folder is written as one transaction (see
        [`~memit_hf.editor_state.write_state`]): a reader sees the previous state or this one, never a mix, and the
        adapters of batches undone by [`rollback`] are removed. Run [`~memit_hf.editor_state.StateLock`] around a
        load-edit-save cycle that other runs may share.

        Args:
            path (`str` or `Path`, *optional*): the state folder (created; a state already there is replaced);
                default `args.output_dir`.
            save_adapters (`bool`, *optional*, defaults to `True`): also write the adapters.
            include_requests (`bool`, *optional*, defaults to `True`): list the requests in the adapters' metadata
                and cards (the state itself always keeps them: it needs them to be continued and rolled back).
            base_model_name_or_path (`str`, *optional*): the base model's Hub id to record in the adapters.
            on_step (`Callable[[str], None]`, *optional*): called before each file operation of the commit (a seam
                for tests of interrupted saves).

        Returns:
            [`~memit_hf.export.ExportReport`] of the whole-history adapter (`None` without adapters, without edits
            or on non-main processes).
        """
        path = output_folder(path, self.args.output_dir)
        state = self.editor_state()
        reports: list[ExportReport | None] = []

        def write_exports(folder: Path) -> None:
            if save_adapters:
                model_info = self.base_model_info
                history = self.edit_history
                reports.append(
                    write_history_adapters(folder, history, model_info, include_requests, base_model_name_or_path)
                )

        def write() -> ExportReport | None:
            write_state(state, path, write_exports, on_step)
            num_batches = len(self.edit_history.records())
            logger.info("Saved the editor state (%d batches, %d edits) to %s.", num_batches, state.num_edits, path)
            report = reports[0] if reports else None
            if report is not None:
                report.path = str(path)
            return report

        return on_main_process(self.state, write)

    @classmethod
    def from_state(
        cls: type[EditorType],
        model: PreTrainedModel | str,
        path: str | Path,
        args: EditingArguments | None = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        stats_dataset: Any = None,
        callbacks: list[EditorCallback] | None = None,
    ) -> EditorType:
        """Continue a sequence of edits saved by [`save_state`]: re-apply its batches to the base `model`, exactly,
        and restore the method's state, the context templates and the history (so [`rollback`] and the exports work
        across processes).

        A state folder is data: it never chooses how `model` is loaded, where statistics come from or where anything
        is published (`model_init_kwargs`, `stats_repo`, `stats_cache_dir`, `hub_*`, `output_dir` always come from
        `args` or the defaults, see [`~memit_hf.arguments.CALLER_FIELDS`]). It is trusted input for the edits it
        holds: every factor is checked (module among the state's edited layers, shape, finite values) and every
        request validated before anything is applied, and any failure leaves `model` bit-identical to what it was.

        Args:
            model (`PreTrainedModel` or `str`): the original base model the state was made on (not a merged
                checkpoint), or its id / path (loaded with `args.model_init_kwargs`, never the state's).
            path (`str` or `Path`): the state folder.
            args ([`EditingArguments`], *optional*): the arguments of the next edits; default: the editing
                hyperparameters saved with the state and the defaults for everything else. They must name the saved
                method, configuration and layers.
            processing_class, stats_dataset, callbacks: as in [`Editor`]; `stats_dataset` (or `args.stats_repo`)
                must give the statistics the saved edits used (the statistics fingerprints are checked).

        Returns:
            [`Editor`]: holding the saved edits.

        Raises:
            FileNotFoundError: when `path` holds no state.
            StateMismatchError: for a malformed state or one made for another model, other statistics, or other
                method settings; the model is then unchanged.
        """
        path = Path(path)
        state = read_state(path)
        if args is None:
            try:
                args = EditingArguments.from_saved(state.arguments)
            except (TypeError, ValueError) as error:
                message = f"The arguments saved in the editor state in `{path}` are invalid: {error}"
                raise StateMismatchError(message) from error
        editor = cls(model, args, processing_class, stats_dataset, callbacks)
        editor.load_state(state, str(path))
        return editor

    def load_state(self, state: EditorState, where: str = "the state") -> None:
        """Hold the edits of `state` (read with [`~memit_hf.editor_state.read_state`]) on this editor's model, which
        holds none: everything is checked against the model, the arguments and the statistics first, then applied
        all or nothing (see [`from_state`]).

        Raises:
            ValueError: when this editor holds edits already.
            StateMismatchError: as in [`from_state`].
        """
        if self.edit_history.records():
            raise ValueError("`load_state` needs an editor that holds no edit: call `restore()` first.")
        args = self.resolved_args
        check_arguments(state, args.algorithm, args.algorithm_config, args.layers, args.merge_edits, where)
        check_model(state, self.base_model_info, self._original_weight_digests(list(state.original_weights)), where)
        check_state_content(state, self.model, {self.layout.edit_name(layer) for layer in args.layers}, where)
        try:
            requests = [load_requests(batch.requests) for batch in state.batches]
        except (TypeError, ValueError) as error:
            raise StateMismatchError(f"The editor state in `{where}` holds an invalid request: {error}") from error
        if state.statistics:
            fingerprints = self.statistics.fingerprints(saved_layers(state))
            keys = {self.layout.edit_name(layer): fingerprint_key(fp) for layer, fp in fingerprints.items()}
            legacy = {self.layout.edit_name(layer): legacy_fingerprint_key(fp) for layer, fp in fingerprints.items()}
            check_statistics(state, keys, where, legacy)
        model_info = self.base_model_info
        batches = [
            EditOutput(batch.deltas, dict(batch.record.metrics), batch_requests, None, batch.record, model_info)
            for batch, batch_requests in zip(state.batches, requests)
        ]
        for output, batch in zip(batches, state.batches):
            output.state_increments = list(batch.increments)
        algorithm = get_algorithm(args.algorithm, args.algorithm_config)
        self.edit_history.load(batches, args.merge_edits, state.floor, algorithm, state.algorithm_state)
        self.context_templates = [list(group) for group in state.context_templates]
        if self.state.is_main_process:
            logger.info(
                "Continued the editor state in %s: %d batches, %d edits.", where, len(state.batches), state.num_edits
            )
