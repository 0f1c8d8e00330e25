"""The on-disk statistics cache: one safetensors file per module, named by its fingerprint key, with the fingerprint
and a checksum beside it in JSON; written atomically and verified on load."""

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .collection import SecondMoment
from .fingerprint import fingerprint_key


logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """`$HF_HOME/memit_hf/stats`."""
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "memit_hf" / "stats"


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class StatisticsCache:
    """Second moments on disk, keyed by their fingerprint.

    Args:
        directory (`str` or `Path`, *optional*): the cache folder; defaults to [`default_cache_dir`].
    """

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = Path(directory) if directory is not None else default_cache_dir()

    def paths(self, fingerprint: dict[str, Any]) -> tuple[Path, Path]:
        """The tensor file and the JSON file of `fingerprint`."""
        stem = fingerprint["module"].replace("/", "_") + "-" + fingerprint_key(fingerprint)
        return self.directory / f"{stem}.safetensors", self.directory / f"{stem}.json"

    def load(self, fingerprint: dict[str, Any]) -> SecondMoment | None:
        """The cached statistic of `fingerprint`, or `None` when absent, truncated, corrupted or stale (logged)."""
        tensor_path, meta_path = self.paths(fingerprint)
        if not tensor_path.exists() or not meta_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if meta["fingerprint"] != fingerprint:
                raise ValueError("fingerprint mismatch")
            if file_sha256(tensor_path) != meta["sha256"]:
                raise ValueError("checksum mismatch")
            tensors = load_file(str(tensor_path))
            total, count = tensors["total"], int(tensors["count"].item())
            if total.dtype != torch.float64 or total.ndim != 2 or total.shape[0] != total.shape[1] or count <= 0:
                raise ValueError("unexpected content")
            return SecondMoment(total, count)
        except Exception as error:  # any damage means recompute, never silent use
            logger.warning("Ignoring damaged statistics cache %s (%s); recomputing.", tensor_path, error)
            return None

    def save(self, fingerprint: dict[str, Any], moment: SecondMoment) -> Path:
        """Write the statistic atomically (temporary file, then rename) with its fingerprint and checksum."""
        self.directory.mkdir(parents=True, exist_ok=True)
        tensor_path, meta_path = self.paths(fingerprint)
        with tempfile.NamedTemporaryFile(dir=self.directory, suffix=".tmp", delete=False) as handle:
            tmp_tensor = Path(handle.name)
        save_file({"total": moment.total.contiguous(), "count": torch.tensor([moment.count])}, str(tmp_tensor))
        meta = {"fingerprint": fingerprint, "sha256": file_sha256(tmp_tensor), "count": moment.count}
        with tempfile.NamedTemporaryFile("w", dir=self.directory, suffix=".tmp", delete=False) as handle:
            json.dump(meta, handle, indent=2)
            tmp_meta = Path(handle.name)
        os.replace(tmp_tensor, tensor_path)
        os.replace(tmp_meta, meta_path)
        return tensor_path
