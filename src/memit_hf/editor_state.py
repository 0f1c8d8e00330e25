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
from typing import Any

import torch
from safetensors.torch import load_file

from .deltas import LayerDelta, make_delta
from .files import entry_lock, file_sha256, save_tensors
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


class StateMismatchError(ValueError):
    """Raised when a saved editor state does not belong to the model, statistics or arguments at hand, or is
    malformed."""


class StateLockedError(RuntimeError):
    """Raised when another run holds the lock of a state folder."""


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
class HistoryFloor:
    """The batches of a sequence that `keep_history` consolidated: what rollback cannot go below.

    Args:
        weights (`dict[str, torch.Tensor]`): the edited modules' weights after these batches, bit for bit (the kept
            batches are applied on them).
        algorithm_state (`dict[str, torch.Tensor]`): the method's committed state after them.
        deltas (`list[LayerDelta]`): their updates summed exactly, one per module (what exported adapters hold).
        batches (`list[dict]`): their metadata entries, in order (requests included).
    """

    weights: dict[str, torch.Tensor]
    algorithm_state: dict[str, torch.Tensor]
    deltas: list[LayerDelta]
    batches: list[dict[str, Any]]

    @property
    def num_edits(self) -> int:
        return sum(int(batch.get("num_requests", 0)) for batch in self.batches)


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
        batches.append({"deltas": deltas, "increments": increments, "metadata": batch.metadata,
                        "requests": batch.requests})  # fmt: skip
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
        floor = {"batches": state.floor.batches, "deltas": deltas}
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
            )  # fmt: skip
            for j, entry in enumerate(entries)
        ]

    batches = []
    for i, batch in enumerate(manifest["batches"]):
        deltas = deltas_of(batch["deltas"], f"batches.{i}.deltas")
        increments = [
            (str(entry["module"]), str(entry["key"]), tensor(f"batches.{i}.increments.{j}"))
            for j, entry in enumerate(batch["increments"])
        ]
        if not isinstance(batch["metadata"], dict) or not isinstance(batch["requests"], list):
            raise StateMismatchError(f"Batch {i} of the editor state in `{path}` has malformed metadata or requests.")
        batches.append(SavedBatch(deltas, increments, batch["metadata"], batch["requests"]))

    def prefixed(prefix: str) -> dict[str, torch.Tensor]:
        return {name[len(prefix) :]: t for name, t in tensors.items() if name.startswith(prefix)}

    for name in ("model", "original_weights", "algorithm_config", "arguments", "statistics"):
        if not isinstance(manifest[name], dict):
            raise StateMismatchError(f"Field `{name}` of the editor state in `{path}` is not a mapping.")
    floor = None
    if manifest.get("floor") is not None:
        entry = manifest["floor"]
        floor_deltas = deltas_of(entry["deltas"], "floor.deltas")
        if not isinstance(entry["batches"], list) or not all(isinstance(b, dict) for b in entry["batches"]):
            raise StateMismatchError(f"The consolidated batches of the editor state in `{path}` are malformed.")
        floor = HistoryFloor(prefixed("floor.weights."), prefixed("floor.algorithm."), floor_deltas, entry["batches"])
    return EditorState(
        model=manifest["model"],
        original_weights=manifest["original_weights"],
        algorithm=str(manifest["algorithm"]),
        algorithm_config=manifest["algorithm_config"],
        arguments=manifest["arguments"],
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
