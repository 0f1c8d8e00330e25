"""Edits as standard peft LoRA adapters: exact factors, optional SVD compression, and the files peft reads.

A MEMIT update of one module is `Delta = B A` with `B` the residuals `(d_out, n)` and `A` the adjusted keys
`(n, d_in)`. A LoRA adapter with `r = lora_alpha = n` (scaling 1) stores exactly that product, so the adapter holds the
edit without loss. Several edits of the same module add up, which concatenated factors express exactly. When the rank
exceeds `min(d_in, d_out)` the product is re-factored through a thin QR and an SVD of the small core to that rank (exact
up to float error); a lower `export_rank` truncates it, and the relative error is reported.
"""

import fnmatch
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .deltas import LayerDelta
from .files import new_file_mode, process_alive, save_tensors
from .redaction import redact


logger = logging.getLogger(__name__)

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
EDITS_METADATA_NAME = "memit_edits.json"
"""File next to the adapter (or merged checkpoint) holding the edit metadata: requests, algorithm, layers,
hyperparameters, statistics fingerprints and library version."""
METADATA_FORMAT_VERSION = 1
CARD_NAME = "README.md"
EDIT_METRICS_NAME = "edit_metrics.json"
"""The metrics and resolved arguments `memit-hf edit` writes beside the edit."""

ARTEFACT_KINDS = ("adapter", "checkpoint")
"""What an output folder holds: a peft `"adapter"` or a full (merged) `"checkpoint"`; never both."""
ADAPTER_FILES = (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, "adapter_model.bin")
"""The files of a peft adapter (`adapter_model.bin`: the weights of older peft saves)."""
CHECKPOINT_FILES = (
    "config.json",
    "generation_config.json",
    "model*.safetensors",
    "model*.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model*.bin.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)
"""Name patterns (`fnmatch`) of the files `save_pretrained` writes for a model and its tokenizer."""
CHECKPOINT_MARKERS = CHECKPOINT_FILES[:6]
"""The patterns that make a folder a checkpoint (tokenizer files alone may sit beside an adapter)."""
STAGING_PREFIX = ".staging-"
"""Name prefix of the staging folders made inside an output folder: `.staging-<pid>-<random>`."""
STALE_STAGING_SECONDS = 24 * 3600.0
"""Age after which a staging folder is removed even if its process id is alive (ids are reused)."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_STAGING_NAME = re.compile(rf"^{re.escape(STAGING_PREFIX)}(\d+)-")


@dataclass
class ExportReport:
    """What an export wrote, and how faithful it is.

    Args:
        path (`str`): the output directory.
        ranks (`dict[str, int]`): the stored rank of every module.
        reconstruction_errors (`dict[str, float]`): `||Delta - B A||_F / ||Delta||_F` per module (0 for exact factors,
            float error after an exact SVD re-factorisation, the truncation error below it).
        num_parameters (`int`): numbers stored in the adapter (sum of `r (d_in + d_out)`).
        adapter_bytes (`int`): size of `adapter_model.safetensors` on disk.
        dense_bytes (`int`): size the same updates would take as dense float32 matrices.
        export_rank (`int` or `float`, *optional*): the requested rank or energy fraction.
        files (`list[str]`): the files this export wrote, relative to `path` (what a push of it uploads).
    """

    path: str
    ranks: dict[str, int]
    reconstruction_errors: dict[str, float]
    num_parameters: int
    adapter_bytes: int
    dense_bytes: int
    export_rank: int | float | None = None
    files: list[str] = field(default_factory=list)

    @property
    def max_reconstruction_error(self) -> float:
        return max(self.reconstruction_errors.values(), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "max_reconstruction_error": self.max_reconstruction_error}


def combine_deltas(deltas: Iterable[LayerDelta]) -> list[LayerDelta]:
    """Sum the updates of each module exactly, by concatenating their factors (`B1 A1 + B2 A2 = [B1 B2] [A1; A2]`).

    Args:
        deltas (`Iterable[LayerDelta]`): updates, possibly several per module (e.g. from successive `edit()` calls).

    Returns:
        `list[LayerDelta]`: one update per module, in the order modules first appear.
    """
    grouped: dict[str, list[LayerDelta]] = {}
    for delta in deltas:
        grouped.setdefault(delta.module_name, []).append(delta)
    combined = []
    for name, parts in grouped.items():
        if len(parts) == 1:
            combined.append(parts[0])
            continue
        combined.append(
            LayerDelta(
                name,
                torch.cat([part.lora_B for part in parts], dim=1),
                torch.cat([part.lora_A for part in parts], dim=0),
                parts[0].fan_in_fan_out,
            )
        )
    return combined


def _truncation_rank(singular_values: torch.Tensor, rank: int | float | None, limit: int) -> int:
    if rank is None:
        return limit
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise TypeError(f"`export_rank` must be an int, a float in (0, 1] or None, got {rank!r}.")
    if isinstance(rank, int):
        if rank < 1:
            raise ValueError(f"`export_rank` must be at least 1, got {rank}.")
        return min(rank, limit)
    if not 0.0 < rank <= 1.0:
        raise ValueError(f"A float `export_rank` is a fraction of the energy in (0, 1], got {rank}.")
    energy = singular_values.pow(2)
    cumulative = energy.cumsum(0) / energy.sum().clamp_min(torch.finfo(energy.dtype).tiny)
    return min(limit, int((cumulative < rank - 1e-12).sum().item()) + 1)


def compress_delta(delta: LayerDelta, rank: int | float | None = None) -> tuple[LayerDelta, float]:
    """Re-factor `B A` into balanced factors of rank at most `min(d_in, d_out)`, or lower.

    `B = Q_B R_B` and `A^T = Q_A R_A` (thin QR), then the SVD `R_B R_A^T = U S V^T` of the small core gives
    `B' = Q_B U_k S_k^(1/2)` and `A' = S_k^(1/2) V_k^T Q_A^T`. Computed in float64; never forms the dense matrix.

    Args:
        delta (`LayerDelta`): the update to re-factor.
        rank (`int` or `float`, *optional*): keep this many singular values (`int`), or the fewest whose squared sum
            reaches this fraction of the total (`float` in (0, 1]); `None` keeps every non-trivial one.

    Returns:
        `tuple[LayerDelta, float]`: the re-factored update and its relative Frobenius error `||Delta - B' A'|| /
        ||Delta||` (from the discarded singular values).
    """
    B, A = delta.lora_B.double(), delta.lora_A.double()
    q_b, r_b = torch.linalg.qr(B)  # (d_out, k1), (k1, r)
    q_a, r_a = torch.linalg.qr(A.T)  # (d_in, k2), (k2, r)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    keep = _truncation_rank(s, rank, s.shape[0])
    root = s[:keep].sqrt()
    new_B = (q_b @ u[:, :keep]) * root
    new_A = root[:, None] * (vh[:keep] @ q_a.T)
    total = s.pow(2).sum()
    error = float((s[keep:].pow(2).sum() / total).sqrt()) if total > 0 else 0.0
    return LayerDelta(delta.module_name, new_B.float(), new_A.float(), delta.fan_in_fan_out), error


def prepare_deltas(
    deltas: Iterable[LayerDelta], export_rank: int | float | None = None
) -> tuple[list[LayerDelta], dict[str, float]]:
    """Combine the updates per module, then compress those whose rank exceeds `min(d_in, d_out)` (exactly) or, with
    `export_rank`, every module (lossy below its true rank).

    Returns:
        `tuple[list[LayerDelta], dict[str, float]]`: the updates to store and the relative error of each.
    """
    prepared, errors = [], {}
    for delta in combine_deltas(deltas):
        d_out, d_in = delta.lora_B.shape[0], delta.lora_A.shape[1]
        if export_rank is not None or delta.rank > min(d_in, d_out):
            delta, error = compress_delta(delta, export_rank)
        else:
            error = 0.0
        prepared.append(delta)
        errors[delta.module_name] = error
    return prepared, errors


def adapter_state_dict(deltas: list[LayerDelta]) -> dict[str, torch.Tensor]:
    """The tensors of `adapter_model.safetensors`, keyed as peft saves them (`base_model.model.<module>.lora_A.weight`
    is `(r, in)` and `...lora_B.weight` is `(out, r)`, for `nn.Linear` and GPT-2 `Conv1D` alike)."""
    tensors = {}
    for delta in deltas:
        prefix = f"base_model.model.{delta.module_name}"
        tensors[f"{prefix}.lora_A.weight"] = delta.lora_A.detach().float().cpu().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = delta.lora_B.detach().float().cpu().contiguous()
    return tensors


def lora_config(
    deltas: list[LayerDelta], base_model_name_or_path: str | None = None, revision: str | None = None
) -> "peft.LoraConfig":  # noqa: F821
    """A `LoraConfig` that makes peft apply every delta with scaling 1: `r = lora_alpha = rank` per module through
    `rank_pattern` / `alpha_pattern` (keys are the escaped full module names), targets given by full name (so that
    GPT-2's `attn.c_proj` is never hit when editing `mlp.c_proj`), no dropout, no rsLoRA, `fan_in_fan_out` for
    `Conv1D` modules.

    Raises:
        ValueError: if `deltas` is empty or mixes `Conv1D` and `nn.Linear` modules.
    """
    from peft import LoraConfig, TaskType

    if not deltas:
        raise ValueError("There is no edit to export.")
    fan_in_fan_out = {delta.fan_in_fan_out for delta in deltas}
    if len(fan_in_fan_out) != 1:
        raise ValueError("Cannot store `Conv1D` and `nn.Linear` edits in one adapter.")
    ranks = {delta.module_name: delta.rank for delta in deltas}
    top = max(ranks.values())
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        base_model_name_or_path=base_model_name_or_path,
        revision=revision,
        r=top,
        lora_alpha=top,
        target_modules=list(ranks),
        rank_pattern={re.escape(name): rank for name, rank in ranks.items()},
        alpha_pattern={re.escape(name): rank for name, rank in ranks.items()},
        lora_dropout=0.0,
        bias="none",
        use_rslora=False,
        fan_in_fan_out=fan_in_fan_out.pop(),
        init_lora_weights=False,
        inference_mode=True,
    )


def base_model_id(model: Any, explicit: str | None = None) -> str | None:
    """The name written as the adapter's `base_model_name_or_path`: `explicit` when given, else the model's
    `name_or_path` unless it is a path inside the temporary directory (which would not exist for anyone loading the
    adapter later; `None` is written then, and the export warns)."""
    if explicit is not None:
        return explicit
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    if not name:
        return None
    path = Path(name)
    if path.exists() or path.is_absolute():
        resolved = path.resolve()
        temp = Path(tempfile.gettempdir()).resolve()
        if resolved == temp or temp in resolved.parents:
            return None
        return str(resolved)
    return name if _HUB_ID.match(name) else None


def write_json(path: Path, value: Any) -> None:
    """Write `value` as indented JSON atomically (temporary file, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------ output folders and staging
def remove_stale_staging(path: str | os.PathLike, max_age: float = STALE_STAGING_SECONDS) -> list[str]:
    """Remove the staging folders (`.staging-<pid>-<random>`) in `path` that killed writers left behind: those whose
    process is gone, and those older than `max_age` seconds (process ids are reused). A live writer's folder is
    kept.

    Args:
        path (`str` or `os.PathLike`): the output folder.
        max_age (`float`, *optional*, defaults to one day): age in seconds (of the folder's last change) after which
            a staging folder is removed whatever its process.

    Returns:
        `list[str]`: the names of the folders removed.
    """
    path = Path(path)
    if not path.is_dir():
        return []
    now, removed = time.time(), []
    for entry in sorted(path.iterdir()):
        match = _STAGING_NAME.match(entry.name)
        if match is None or entry.is_symlink() or not entry.is_dir():
            continue
        try:
            age = now - entry.stat().st_mtime
        except FileNotFoundError:  # its writer just finished
            continue
        if age <= max_age and process_alive(int(match.group(1))):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry.name)
    if removed:
        logger.info("Removed stale staging folders %s from %s.", removed, path)
    return removed


@contextmanager
def staging_folder(path: str | os.PathLike) -> Iterator[Path]:
    """A new empty folder `path/.staging-<pid>-<random>` to write files into before moving them into `path`, removed
    on exit.

    It lies inside `path` (created if needed), so moving a file from it is a rename within one file system (atomic per
    file) and nothing is written next to `path`, whose parent may be read-only (a mounted volume's root). The stale
    staging folders in `path` are removed first (see [`remove_stale_staging`]).

    Args:
        path (`str` or `os.PathLike`): the output folder.

    Yields:
        `Path`: the staging folder.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(path)
    staging = path / f"{STAGING_PREFIX}{os.getpid()}-{secrets.token_hex(6)}"
    staging.mkdir()  # the umask's permissions (not `mkdtemp`'s 0o700): its files get them too, see `save_tensors`
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_kind(kind: str) -> None:
    if kind not in ARTEFACT_KINDS:
        raise ValueError(f"`kind` must be one of {ARTEFACT_KINDS}, got {kind!r}.")


def _other_kind(kind: str) -> str:
    return "checkpoint" if kind == "adapter" else "adapter"


def _describe_kind(kind: str) -> str:
    return "a peft adapter" if kind == "adapter" else "a full model checkpoint"


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def artefact_files(path: str | os.PathLike, kind: str) -> list[str]:
    """The files at the top of `path` that belong to an artefact of `kind`: [`ADAPTER_FILES`] for `"adapter"`, the
    patterns of [`CHECKPOINT_FILES`] (model, generation config, weights, tokenizer) for `"checkpoint"`.

    Args:
        path (`str` or `os.PathLike`): the folder (missing: no files).
        kind (`str`): `"adapter"` or `"checkpoint"`.

    Returns:
        `list[str]`: the file names, sorted.

    Raises:
        ValueError: for an unknown `kind`.
    """
    _check_kind(kind)
    path = Path(path)
    if not path.is_dir():
        return []
    patterns = ADAPTER_FILES if kind == "adapter" else CHECKPOINT_FILES
    return sorted(entry.name for entry in path.iterdir() if entry.is_file() and _matches(entry.name, patterns))


def check_output_dir(path: str | os.PathLike, kind: str, overwrite_output_dir: bool = False) -> list[str]:
    """Check that writing an artefact of `kind` into `path` mixes no two kinds: a folder holding an adapter next to a
    full checkpoint makes `from_pretrained` load the adapter on top of the (already edited) merged weights.

    Args:
        path (`str` or `os.PathLike`): the output folder.
        kind (`str`): what is about to be written, `"adapter"` or `"checkpoint"`.
        overwrite_output_dir (`bool`, *optional*, defaults to `False`): consent to remove the other kind's files.

    Returns:
        `list[str]`: the other kind's files in `path` that the write removes (empty when there are none).

    Raises:
        ValueError: when `path` holds the other kind of artefact and `overwrite_output_dir` is `False`; the message
            names the folder and the files found.
    """
    _check_kind(kind)
    other = _other_kind(kind)
    found = artefact_files(path, other)
    markers = ADAPTER_FILES if other == "adapter" else CHECKPOINT_MARKERS
    if not any(_matches(name, markers) for name in found):
        return []  # nothing, or only tokenizer files (which may sit beside an adapter)
    if not overwrite_output_dir:
        raise ValueError(
            f"The output folder {path} already holds {_describe_kind(other)} ({', '.join(found)}); writing "
            f"{_describe_kind(kind)} there would mix the two (`from_pretrained` would load the adapter on top of the "
            "merged weights, a double edit). Write to another folder, or pass `overwrite_output_dir=True` "
            "(`memit-hf edit --overwrite_output_dir`) to remove those files."
        )
    return found


def remove_artefact_files(path: str | os.PathLike, kind: str) -> list[str]:
    """Delete the files of an artefact of `kind` at the top of `path` (see [`artefact_files`]), and nothing else.

    Returns:
        `list[str]`: the names of the files removed.
    """
    removed = artefact_files(path, kind)
    for name in removed:
        (Path(path) / name).unlink(missing_ok=True)
    if removed:
        logger.info("Removed the %s files %s from %s.", kind, removed, path)
    return removed


def _staged_files(staging: Path) -> list[str]:
    return sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())


def _install(staging: Path, path: Path, kind: str, overwrite_output_dir: bool) -> list[str]:
    """Move the files staged for an artefact of `kind` into `path`: the other kind's files are removed first (with
    consent), the config moves last (it makes the folder loadable), and the files of `kind` that the new artefact does
    not have (older shards, an `adapter_model.bin`) are removed at the end. Returns the files moved in."""
    written = _staged_files(staging)
    other = check_output_dir(path, kind, overwrite_output_dir)  # again: the folder may have changed meanwhile
    for name in other:
        (path / name).unlink(missing_ok=True)
    if other:
        logger.warning("Removed the %s files %s from %s (overwrite_output_dir).", _other_kind(kind), other, path)
    config = ADAPTER_CONFIG_NAME if kind == "adapter" else "config.json"
    for name in sorted(written, key=lambda name: (name == config, name)):
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / name, path / name)
    for name in artefact_files(path, kind):
        if name not in written:
            (path / name).unlink(missing_ok=True)
    return written


def save_adapter_files(
    deltas: Iterable[LayerDelta],
    path: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    revision: str | None = None,
    export_rank: int | float | None = None,
    metadata: dict[str, Any] | None = None,
    repo_id: str | None = None,
    overwrite_output_dir: bool = False,
    for_hub: bool = False,
) -> ExportReport:
    """Write a peft LoRA adapter holding `deltas` to `path`.

    Files: `adapter_config.json`, `adapter_model.safetensors`, and when given `memit_edits.json` (`metadata`, completed
    with the export report and the list of files written) and the model card `README.md` built from both. They are
    written in a staging folder inside `path` (see [`staging_folder`]), then moved into `path` one by one, the config
    last, so a failed write leaves what `path` held untouched. Other files already in `path` (metrics, a tokenizer)
    are kept, except an older `adapter_model.bin`; a full checkpoint there is refused (or, with
    `overwrite_output_dir`, removed): one folder holds one kind of artefact.

    Args:
        deltas (`Iterable[LayerDelta]`): the updates (several per module are summed exactly).
        path (`str` or `os.PathLike`): the output directory (created if needed).
        base_model_name_or_path (`str`, *optional*): the base model's Hub id or path, written to the config.
        revision (`str`, *optional*): the base model's revision.
        export_rank (`int` or `float`, *optional*): store at most this rank per module (`int`) or keep this fraction
            of each update's energy (`float`); lossy below the true rank, the error is reported.
        metadata (`dict`, *optional*): the edit metadata for `memit_edits.json`.
        repo_id (`str`, *optional*): repository named in the model card's loading snippets.
        overwrite_output_dir (`bool`, *optional*, defaults to `False`): remove the files of a full checkpoint found in
            `path` (instead of raising).
        for_hub (`bool`, *optional*, defaults to `False`): the folder is to be published: a local base model path is
            written as `None` (with a warning) and no local absolute path goes into the metadata or the card (see
            [`~memit_hf.cards.public_metadata`]).

    Returns:
        [`ExportReport`]: ranks, reconstruction errors, sizes and the files written.

    Raises:
        ValueError: if `deltas` is empty, or `path` holds a full checkpoint and `overwrite_output_dir` is `False`.
    """
    from .cards import public_base_model, public_metadata

    path = Path(path)
    check_output_dir(path, "adapter", overwrite_output_dir)  # before any work
    prepared, errors = prepare_deltas(deltas, export_rank)
    config = lora_config(
        prepared, public_base_model(base_model_name_or_path) if for_hub else base_model_name_or_path, revision
    )
    tensors = adapter_state_dict(prepared)
    with staging_folder(path) as staging:
        config.save_pretrained(str(staging))
        save_tensors(tensors, staging / ADAPTER_WEIGHTS_NAME, metadata={"format": "pt"})
        report = ExportReport(
            path=str(path),
            ranks={delta.module_name: delta.rank for delta in prepared},
            reconstruction_errors=errors,
            num_parameters=sum(t.numel() for t in tensors.values()),
            adapter_bytes=(staging / ADAPTER_WEIGHTS_NAME).stat().st_size,
            dense_bytes=sum(4 * d.lora_B.shape[0] * d.lora_A.shape[1] for d in prepared),
            export_rank=export_rank,
        )
        if metadata is not None:
            files = sorted({*_staged_files(staging), EDITS_METADATA_NAME, CARD_NAME})
            export = {key: value for key, value in report.to_dict().items() if key != "files"}
            metadata = {**metadata, "files": files, "export": export}
            write_metadata_and_card(staging, public_metadata(metadata) if for_hub else metadata, repo_id)
        report.files = _install(staging, path, "adapter", overwrite_output_dir)
    if report.max_reconstruction_error > 1e-4:
        logger.warning(
            "Adapter rank %s loses part of the edit: max relative reconstruction error %.2e.",
            export_rank,
            report.max_reconstruction_error,
        )
    return report


def write_metadata_and_card(
    folder: str | os.PathLike, metadata: dict[str, Any], repo_id: str | None = None, merged: bool = False
) -> None:
    """Write `memit_edits.json` and the model card `README.md` built from it into `folder`: the one writer of both,
    for adapters and merged checkpoints alike."""
    from .cards import build_model_card

    folder = Path(folder)
    write_json(folder / EDITS_METADATA_NAME, metadata)
    (folder / CARD_NAME).write_text(build_model_card(metadata, repo_id, merged=merged), encoding="utf-8")


def save_merged_checkpoint(
    model: Any,
    tokenizer: Any,
    path: str | os.PathLike,
    metadata: dict[str, Any],
    repo_id: str | None = None,
    overwrite_output_dir: bool = False,
    for_hub: bool = False,
    **save_kwargs: Any,
) -> list[str]:
    """Save the edited model as a full checkpoint (`save_pretrained`) with its tokenizer, `memit_edits.json` (which
    lists the files written) and a model card.

    Everything is written in a staging folder inside `path` first (see [`staging_folder`]) and moved in when complete,
    the config last, so a failed save leaves what `path` held untouched; the checkpoint files of an older checkpoint
    that the new one lacks (other shards, tokenizer files) are removed. An adapter in `path` is refused (or, with
    `overwrite_output_dir`, removed): one folder holds one kind of artefact.

    Args:
        model (`PreTrainedModel`): the model to save, edits merged.
        tokenizer (`PreTrainedTokenizerBase`): its tokenizer.
        path (`str` or `os.PathLike`): the output directory (created if needed).
        metadata (`dict`): the edit metadata (see [`edit_metadata`]).
        repo_id (`str`, *optional*): repository named in the model card's loading snippets.
        overwrite_output_dir (`bool`, *optional*, defaults to `False`): remove the adapter files found in `path`
            (instead of raising).
        for_hub (`bool`, *optional*, defaults to `False`): the folder is to be published: no local absolute path goes
            into the metadata or the card (see [`~memit_hf.cards.public_metadata`]).
        save_kwargs: passed to `save_pretrained` (e.g. `max_shard_size`).

    Returns:
        `list[str]`: the files written, relative to `path`.

    Raises:
        ValueError: if `path` holds an adapter and `overwrite_output_dir` is `False`.
    """
    from .cards import public_metadata

    warn_if_unnamed(metadata, "checkpoint's card")
    path = Path(path)
    check_output_dir(path, "checkpoint", overwrite_output_dir)  # before any work
    with staging_folder(path) as staging:
        model.save_pretrained(staging, **save_kwargs)
        tokenizer.save_pretrained(staging)
        for file in staging.rglob("*"):  # transformers writes its safetensors shards `0o600` too
            if file.is_file():
                os.chmod(file, new_file_mode(staging))
        metadata = {**metadata, "files": sorted({*_staged_files(staging), EDITS_METADATA_NAME, CARD_NAME})}
        write_metadata_and_card(staging, public_metadata(metadata) if for_hub else metadata, repo_id, merged=True)
        return _install(staging, path, "checkpoint", overwrite_output_dir)


def read_edits_metadata(path: str | os.PathLike) -> dict[str, Any] | None:
    """The `memit_edits.json` of an adapter or checkpoint directory, or `None` when it has none."""
    file = Path(path) / EDITS_METADATA_NAME
    if not file.is_file():
        return None
    return json.loads(file.read_text(encoding="utf-8"))


def edit_metadata(
    model_info: dict[str, Any],
    batches: list[dict[str, Any]],
    include_requests: bool = True,
    base_model_name_or_path: str | None = None,
) -> dict[str, Any]:
    """The content of `memit_edits.json`.

    Args:
        model_info (`dict`): the base model's `base_model_name_or_path`, `base_model_revision`, `model_type`,
            `num_parameters` and `embedding_digest`.
        batches (`list[dict]`): one entry per `edit()` call, in order: `algorithm`, `layers`, `num_requests`,
            `hyperparameters`, `statistics` (fingerprint key, corpus and token count per module), `metrics` and
            `requests` (records with `prompt`, `subject`, `target_new`, `target_true`, `case_id`).
        include_requests (`bool`, *optional*, defaults to `True`): keep the request records; their SHA-256 and count
            are always recorded.
        base_model_name_or_path (`str`, *optional*): the base model's Hub id to record instead of `model_info`'s.

    Returns:
        `dict`: JSON-serialisable metadata.
    """
    from .version import __version__

    out_batches = []
    for batch in batches:
        requests = batch.get("requests") or []
        digest = hashlib.sha256(json.dumps(requests, sort_keys=True, default=str).encode()).hexdigest()
        hyper = redact(batch.get("hyperparameters", {}))
        out_batches.append(
            {
                **batch,
                "hyperparameters": hyper,
                "requests_sha256": digest,
                "requests": requests if include_requests else None,
            }
        )
    metadata = {
        "format_version": METADATA_FORMAT_VERSION,
        "memit_hf_version": __version__,
        **model_info,
        "num_edits": sum(batch.get("num_requests", 0) for batch in batches),
        "batches": out_batches,
    }
    if base_model_name_or_path is not None:
        metadata["base_model_name_or_path"] = base_model_name_or_path
    return metadata


def write_edit_adapter(
    deltas: Iterable[LayerDelta],
    path: str | os.PathLike,
    metadata: dict[str, Any],
    export_rank: int | float | None = None,
    repo_id: str | None = None,
    overwrite_output_dir: bool = False,
    for_hub: bool = False,
) -> ExportReport:
    """[`save_adapter_files`] for the edits described by `metadata` (see [`edit_metadata`]), whose base model it names.

    Args:
        deltas, path, export_rank, repo_id, overwrite_output_dir, for_hub: as in [`save_adapter_files`].
        metadata (`dict`): the edit metadata; its `base_model_name_or_path` and `base_model_revision` go to the
            adapter's config.

    Returns:
        [`ExportReport`]: ranks, reconstruction errors, sizes and the files written.
    """
    warn_if_unnamed(metadata, "adapter")
    return save_adapter_files(
        deltas,
        path,
        metadata.get("base_model_name_or_path"),
        metadata.get("base_model_revision"),
        export_rank,
        metadata,
        repo_id,
        overwrite_output_dir=overwrite_output_dir,
        for_hub=for_hub,
    )


def warn_if_unnamed(metadata: dict[str, Any], what: str) -> None:
    """Warn, at export time, when the exported edit cannot name its base model."""
    if metadata.get("base_model_name_or_path") is None:
        logger.warning(
            "The %s records no `base_model_name_or_path`: the model was loaded from a temporary path or has no "
            "name. Pass `base_model_name_or_path=` to name it.",
            what,
        )
