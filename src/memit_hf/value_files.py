"""Target values z on disk: a [`~memit_hf.values.ValueResult`] saved to one safetensors file and read back exactly.

The z optimisation is the costly stage of an edit; a sweep that edits the same requests under several update
settings (lambda, method, layers) computes their z once (`Editor.compute_values`), saves them and passes them to
`Editor.edit(requests, values=...)` in later processes or sessions. The file holds tensors and a JSON header only, so
reading one runs no code.
"""

import json
import os
from dataclasses import fields
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .values import ValueResult


VALUES_FORMAT = "memit_hf.values/1"
"""The `format` entry of a saved file's header."""
_LIST_FIELDS = ("schedule", "chunks", "chunk_seconds", "chunk_build_seconds")


def save_values(values: ValueResult, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write `values` to `path` (safetensors, written atomically).

    Args:
        values ([`~memit_hf.values.ValueResult`]): the target values.
        path (`str` or `os.PathLike`): the file to write.
        metadata (`dict`, *optional*): JSON-serialisable facts to keep beside them (what they were computed for:
            the model, the requests, the settings), read back by [`load_values_metadata`].
    """
    tensors = {}
    header = {"format": VALUES_FORMAT, "z_layer": values.z_layer, "metadata": metadata or {}}
    for item in fields(ValueResult):
        value = getattr(values, item.name)
        if isinstance(value, torch.Tensor):
            tensors[item.name] = value.detach().cpu().contiguous()
        elif item.name in _LIST_FIELDS:
            header[item.name] = value
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata={"memit_hf": json.dumps(header)})
    os.replace(partial, path)


def _header(path: str | os.PathLike) -> tuple[dict, list[str]]:
    with safe_open(str(path), framework="pt") as handle:
        raw = (handle.metadata() or {}).get("memit_hf")
        names = list(handle.keys())
    if raw is None:
        raise ValueError(f"{path} is not a memit-hf values file (no `memit_hf` header).")
    header = json.loads(raw)
    if header.get("format") != VALUES_FORMAT:
        raise ValueError(f"{path} has format {header.get('format')!r}; this memit-hf reads {VALUES_FORMAT!r}.")
    return header, names


def load_values_metadata(path: str | os.PathLike) -> dict:
    """The `metadata` saved with the values in `path` (without reading the tensors)."""
    return _header(path)[0]["metadata"]


def load_values(path: str | os.PathLike) -> ValueResult:
    """The [`~memit_hf.values.ValueResult`] saved in `path` by [`save_values`], bit-identical.

    Raises:
        ValueError: when `path` is not a values file of this format.
    """
    header, names = _header(path)
    with safe_open(str(path), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in names}
    known = {item.name for item in fields(ValueResult)}
    unknown = set(tensors) - known
    if unknown:
        raise ValueError(f"{path} holds tensors this memit-hf does not know: {sorted(unknown)}.")
    lists = {name: header.get(name, []) for name in _LIST_FIELDS}
    return ValueResult(**tensors, **lists, z_layer=header.get("z_layer"))
