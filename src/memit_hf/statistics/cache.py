"""The on-disk statistics cache: one safetensors file per module, named by its fingerprint key, with the fingerprint
and a checksum beside it in JSON; written atomically under a per-entry lock (the folder may be shared between
processes and users) and verified on load, checksum and content. Beside an entry, its spectrum (the
eigendecomposition of the covariance that null-space methods need) is cached once computed, tied to the entry's
checksum."""

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..files import LOCK_SUFFIX, entry_lock, file_sha256, remove_stale_temporary_files, save_tensors, temporary_folder
from .collection import SecondMoment
from .fingerprint import fingerprint_key, legacy_fingerprint_key


logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """`$HF_HOME/memit_hf/stats`."""
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "memit_hf" / "stats"


def entry_name(fingerprint: dict[str, Any]) -> str:
    """The file stem of a statistic: its module and fingerprint key (`<module>-<key>`, `/` replaced by `_`)."""
    return fingerprint["module"].replace("/", "_") + "-" + fingerprint_key(fingerprint)


def link_or_copy(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Put `source` at `target` atomically: a hard link when on the same file system, else a copy (links such as a
    Hub snapshot's are followed; a copy gets the permissions of a new file, `0o666` less the umask), made in a
    [`~memit_hf.statistics.temporary_folder`] and renamed into place."""
    source, target = Path(source).resolve(), Path(target)
    with temporary_folder(target) as folder:
        temporary = folder / target.name
        try:
            os.link(source, temporary)
        except OSError:
            shutil.copyfile(source, temporary)
        os.replace(temporary, target)


SYMMETRY_TOLERANCE = 1e-6
"""Largest `|total - total^T|` accepted in statistics, relative to the largest diagonal entry of `total`."""


def read_second_moment(path: str | os.PathLike) -> SecondMoment:
    """The statistics in a safetensors file: `total` and the integer `count` (unchecked: see
    [`statistics_problems`]).

    Raises:
        ValueError: when the file lacks `total` or `count`, or `count` is not one integer.
    """
    tensors = load_file(str(path))
    missing = sorted({"total", "count"} - set(tensors))
    if missing:
        raise ValueError(f"it holds no {' and no '.join(f'`{name}`' for name in missing)} tensor")
    count = tensors["count"]
    if count.numel() != 1 or count.is_floating_point() or count.is_complex() or count.dtype == torch.bool:
        raise ValueError(f"`count` must be one integer, found {count.dtype} of shape {tuple(count.shape)}")
    return SecondMoment(tensors["total"], int(count.item()))


def statistics_problems(moment: SecondMoment, meta: dict[str, Any], dim: int | None = None) -> list[str]:
    """What is wrong with the content of statistics read from a file, beyond its checksum: `count` must equal the
    JSON's `count`, be positive and at most the fingerprint's `num_tokens` (collection sums at most that many
    tokens, see [`~memit_hf.statistics.token_pieces`]); `total` must be a float64 square matrix of side `dim`,
    finite, symmetric (to [`SYMMETRY_TOLERANCE`]) and with a non-negative diagonal, as a sum of `k k^T` is.

    Args:
        moment ([`SecondMoment`]): the statistics (see [`read_second_moment`]).
        meta (`dict`): the JSON beside them (`count`, `fingerprint`).
        dim (`int`, *optional*): the input size `d_in` of the module they are used for.

    Returns:
        `list[str]`: one sentence per problem (empty when the statistics are sound).
    """
    problems = []
    count, total = moment.count, moment.total
    recorded = meta.get("count")
    if recorded is None:
        problems.append("the JSON has no `count`")
    elif count != recorded:
        problems.append(f"`count` is {count} in the tensors but {recorded} in the JSON")
    if count <= 0:
        problems.append(f"`count` is {count} (it must be positive)")
    budget = meta.get("fingerprint", {}).get("num_tokens")
    if isinstance(budget, int) and count > budget:
        problems.append(f"`count` {count} exceeds the fingerprint's token budget `num_tokens` {budget}")
    if total.dtype != torch.float64:
        problems.append(f"`total` is {str(total.dtype).removeprefix('torch.')} (it must be float64)")
    if total.ndim != 2 or total.shape[0] != total.shape[1]:
        problems.append(f"`total` has shape {tuple(total.shape)} (it must be square, `(d_in, d_in)`)")
        return problems
    size = total.shape[0]
    if dim is not None and size != dim:
        problems.append(f"`total` is {size} x {size} but the module's input has `d_in` {dim}")
    if not total.is_floating_point() or size == 0:
        return problems
    asymmetry, finite = 0.0, True
    for start in range(0, size, 1024):  # by blocks of rows: no second (d_in, d_in) tensor
        rows = total[start : start + 1024]
        if not bool(torch.isfinite(rows).all()):
            finite = False
            break
        asymmetry = max(asymmetry, float((rows - total[:, start : start + 1024].T).abs().max()))
    if not finite:
        problems.append("`total` holds non-finite values (NaN or infinity)")
        return problems
    diagonal = total.diagonal()
    scale = float(diagonal.abs().max())
    if asymmetry > SYMMETRY_TOLERANCE * scale:
        problems.append(
            f"`total` is not symmetric (largest |total - total^T| {asymmetry:.3g}, largest diagonal entry {scale:.3g})"
        )
    if bool((diagonal < 0).any()):
        index = int(diagonal.argmin())
        problems.append(f"`total` has a negative diagonal entry ({float(diagonal[index]):.3g} at index {index})")
    return problems


class StatisticsCache:
    """Second moments on disk, keyed by their fingerprint.

    Args:
        directory (`str` or `Path`, *optional*): the cache folder; defaults to [`default_cache_dir`].
    """

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = Path(directory) if directory is not None else default_cache_dir()

    def paths(self, fingerprint: dict[str, Any]) -> tuple[Path, Path]:
        """The tensor file and the JSON file of `fingerprint`."""
        stem = entry_name(fingerprint)
        return self.directory / f"{stem}.safetensors", self.directory / f"{stem}.json"

    def lock_path(self, fingerprint: dict[str, Any]) -> Path:
        """The lock file held while the entry of `fingerprint` is written (see [`~memit_hf.statistics.entry_lock`])."""
        return self.directory / f"{entry_name(fingerprint)}{LOCK_SUFFIX}"

    def load(self, fingerprint: dict[str, Any], dim: int | None = None) -> SecondMoment | None:
        """The cached statistic of `fingerprint`, or `None` when absent, truncated, corrupted, stale or unsound
        (logged with the reason; see [`statistics_problems`]). An entry matches when its fingerprint has the same
        key (see [`~memit_hf.statistics.fingerprint_key`]: where the model and tokenizer were loaded from does not
        count); an entry an earlier version wrote under its legacy key is adopted first (see
        [`adopt_legacy_entry`]).

        Args:
            dim (`int`, *optional*): the input size `d_in` of the module, which the statistic's side must equal.
        """
        tensor_path, meta_path = self.paths(fingerprint)
        if not tensor_path.exists() or not meta_path.exists():
            if not self.adopt_legacy_entry(fingerprint):
                return None
        try:
            meta = json.loads(meta_path.read_text())
            if fingerprint_key(meta["fingerprint"]) != fingerprint_key(fingerprint):
                raise ValueError("fingerprint mismatch")
            if file_sha256(tensor_path) != meta["sha256"]:
                raise ValueError("checksum mismatch")
            moment = read_second_moment(tensor_path)
            problems = statistics_problems(moment, meta, dim)
            if problems:
                raise ValueError("; ".join(problems))
            return moment
        except Exception as error:  # any damage means recompute, never silent use
            logger.warning("Ignoring damaged statistics cache %s (%s); recomputing.", tensor_path, error)
            return None

    def legacy_paths(self, fingerprint: dict[str, Any]) -> tuple[Path, Path]:
        """The tensor file and the JSON file an earlier version named `fingerprint`'s entry by (see
        [`~memit_hf.statistics.legacy_fingerprint_key`])."""
        stem = fingerprint["module"].replace("/", "_") + "-" + legacy_fingerprint_key(fingerprint)
        return self.directory / f"{stem}.safetensors", self.directory / f"{stem}.json"

    def adopt_legacy_entry(self, fingerprint: dict[str, Any]) -> bool:
        """Give an entry an earlier version wrote under its legacy name (see [`legacy_paths`]) its current name, with
        [`add`] (hard links, or copies, renamed into place under the entry's lock); [`load`] then verifies it as any
        entry. The legacy files stay where they are, for the earlier version.

        Returns:
            `bool`: whether there was such an entry.
        """
        tensor_path, meta_path = self.legacy_paths(fingerprint)
        if not tensor_path.exists() or not meta_path.exists() or tensor_path == self.paths(fingerprint)[0]:
            return False
        try:
            self.add(tensor_path, meta_path)
            spectrum = tensor_path.with_name(f"{tensor_path.stem}.spectrum.safetensors")
            if spectrum.exists():  # tied to the statistics' checksum, which the new name keeps
                link_or_copy(spectrum, self.spectrum_path(fingerprint))
        except (OSError, ValueError, KeyError) as error:
            logger.warning("Ignoring the statistics cache entry %s (%s); recomputing.", tensor_path, error)
            return False
        return True

    def save(self, fingerprint: dict[str, Any], moment: SecondMoment, info: dict[str, Any] | None = None) -> Path:
        """Write the statistic atomically (files in a temporary folder named by this process, then renamed into
        place, under the entry's lock so that two processes writing it at once do not mix their files) with its
        fingerprint and checksum; the files get the permissions of new files under the umask. Temporary files
        that killed runs left in the cache are removed first (see
        [`~memit_hf.statistics.remove_stale_temporary_files`]).

        Args:
            info (`dict`, *optional*): a description stored beside the fingerprint (the layer index, a readable name
                of the corpus) for the statistics' card; it does not identify the statistics.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        remove_stale_temporary_files(self.directory)
        tensor_path, meta_path = self.paths(fingerprint)
        with entry_lock(self.lock_path(fingerprint)), temporary_folder(tensor_path) as folder:
            tmp_tensor, tmp_meta = folder / tensor_path.name, folder / meta_path.name
            save_tensors({"total": moment.total.contiguous(), "count": torch.tensor([moment.count])}, tmp_tensor)
            meta = {"fingerprint": fingerprint, "sha256": file_sha256(tmp_tensor), "count": moment.count}
            if info:
                meta["info"] = info
            tmp_meta.write_text(json.dumps(meta, indent=2), encoding="utf-8")
            os.replace(tmp_tensor, tensor_path)
            os.replace(tmp_meta, meta_path)
        return tensor_path

    def spectrum_path(self, fingerprint: dict[str, Any]) -> Path:
        """The file of the spectrum of `fingerprint`'s statistics."""
        return self.directory / f"{entry_name(fingerprint)}.spectrum.safetensors"

    def _statistics_sha256(self, fingerprint: dict[str, Any]) -> str | None:
        meta_path = self.paths(fingerprint)[1]
        return json.loads(meta_path.read_text())["sha256"] if meta_path.exists() else None

    def load_spectrum(self, fingerprint: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The cached spectrum of `fingerprint`'s statistics: `(eigenvalues (d,), eigenvectors (d, d))`, float64,
        eigenvalues ascending; `None` when absent, damaged or made from other statistics than the cached entry (its
        checksum is recorded in the spectrum file)."""
        path = self.spectrum_path(fingerprint)
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                made_from = (handle.metadata() or {}).get("statistics_sha256")
            if made_from is None or made_from != self._statistics_sha256(fingerprint):
                raise ValueError("made from other statistics")
            tensors = load_file(str(path))
            eigenvalues, eigenvectors = tensors["eigenvalues"], tensors["eigenvectors"]
            size = eigenvalues.shape[0]
            if eigenvalues.dtype != torch.float64 or eigenvectors.shape != (size, size):
                raise ValueError("unexpected content")
            return eigenvalues, eigenvectors
        except Exception as error:  # recompute, never use a doubtful spectrum
            logger.warning("Ignoring the cached spectrum %s (%s); recomputing.", path, error)
            return None

    def save_spectrum(
        self, fingerprint: dict[str, Any], eigenvalues: torch.Tensor, eigenvectors: torch.Tensor
    ) -> Path | None:
        """Write the spectrum of `fingerprint`'s statistics beside them, atomically, tied to their checksum; nothing
        is written (`None`) when the statistics themselves are not in this cache."""
        made_from = self._statistics_sha256(fingerprint)
        if made_from is None:
            return None
        remove_stale_temporary_files(self.directory)
        path = self.spectrum_path(fingerprint)
        with temporary_folder(path) as folder:
            tensors = {"eigenvalues": eigenvalues.contiguous(), "eigenvectors": eigenvectors.contiguous()}
            save_tensors(tensors, folder / path.name, metadata={"statistics_sha256": made_from})
            os.replace(folder / path.name, path)
        return path

    def add(self, tensor_path: str | os.PathLike, meta_path: str | os.PathLike) -> dict[str, Any]:
        """Put a cache entry made elsewhere (a statistics folder or Hub repository) into this cache: hard-linked
        when on the same file system, else copied; each file lands atomically under its cache name, both under the
        entry's lock (see [`save`]).

        Returns:
            `dict`: the entry's fingerprint (read its statistic with [`load`], which verifies the checksum).
        """
        fingerprint = json.loads(Path(meta_path).read_text())["fingerprint"]
        self.directory.mkdir(parents=True, exist_ok=True)
        remove_stale_temporary_files(self.directory)
        with entry_lock(self.lock_path(fingerprint)):
            for source, target in zip((tensor_path, meta_path), self.paths(fingerprint)):
                if Path(source).resolve() != target.resolve():
                    link_or_copy(source, target)
        return fingerprint
