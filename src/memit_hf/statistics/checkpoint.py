"""Checkpoints of a statistics collection in progress, so that an interrupted collection resumes where it stopped.

A checkpoint holds one process's partial float64 sums, its token count and its position in its own share of the
batches (processes take batches round-robin and sum only their own until the final reduction), in one safetensors
file per process next to the cache entries, replaced atomically. A resumed process continues the same left-to-right
sum over the same batches from the restored float64 sums, so the result is bit-identical to an uninterrupted run.
The file name holds the collection's key and the process's rank and world size: a run with another number of
processes starts afresh (its shares differ).
"""

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..files import remove_stale_temporary_files, save_tensors, temporary_folder
from .fingerprint import fingerprint_key
from .gram import GRAM_BLOCKS


logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT_VERSION = 1
CHECKPOINT_SUFFIX = ".ckpt"


def collection_key(fingerprints: list[dict[str, Any]], batch_tokens: int) -> str:
    """The identity of one collection pass: the fingerprints of the modules it sums (which fix the model and the token
    pieces) and `batch_tokens` (which fixes the batches, hence the summation order).

    Returns:
        `str`: a 24-character hex key.
    """
    keys = sorted(fingerprint_key(fingerprint) for fingerprint in fingerprints)
    payload = json.dumps({"format": CHECKPOINT_FORMAT_VERSION, "modules": keys, "batch_tokens": batch_tokens})
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


@dataclass
class CollectionProgress:
    """The partial state of one process's collection.

    Args:
        totals (`dict[str, torch.Tensor]`): per module, the float64 `(d_in, d_in)` sum of `k k^T` so far, in its
            upper block triangle (see [`~memit_hf.statistics.add_gram`] with `mirror=False`).
        count (`int`): tokens summed so far.
        position (`int`): batches of this process's share summed so far.
    """

    totals: dict[str, torch.Tensor]
    count: int
    position: int


class StatisticsCheckpoint:
    """Where one process saves and finds the progress of a collection, and when it saves.

    Args:
        directory (`str` or `Path`): the folder (the statistics cache directory).
        key (`str`): the collection's key (see [`collection_key`]).
        every_batches (`int`, *optional*): save after every this many batches of this process's share.
        every_seconds (`float`, *optional*): save when this many seconds have passed since the last save (or the
            start). With neither, [`due`] is never true and the checkpoint is only read.
        process_index (`int`, *optional*, defaults to `0`), num_processes (`int`, *optional*, defaults to `1`):
            this process's rank and the world size.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        key: str,
        every_batches: int | None = None,
        every_seconds: float | None = None,
        process_index: int = 0,
        num_processes: int = 1,
    ):
        self.directory = Path(directory)
        self.key = key
        self.every_batches = every_batches
        self.every_seconds = every_seconds
        self.process_index = process_index
        self.num_processes = num_processes
        self._last_position: int | None = None
        self._last_time = time.monotonic()

    @property
    def path(self) -> Path:
        """This process's checkpoint file."""
        name = f"collection-{self.key}.rank{self.process_index}-of-{self.num_processes}{CHECKPOINT_SUFFIX}"
        return self.directory / name

    def start(self, position: int) -> None:
        """Start the save clocks at `position` (the batch the collection starts or resumes from)."""
        self._last_position = position
        self._last_time = time.monotonic()

    def due(self, position: int) -> bool:
        """Whether a save is due now that `position` batches of this process's share are summed."""
        last = self._last_position or 0
        if self.every_batches is not None and position - last >= self.every_batches:
            return True
        return self.every_seconds is not None and time.monotonic() - self._last_time >= self.every_seconds

    def save(self, progress: CollectionProgress, num_batches: int) -> Path:
        """Write `progress` atomically: a file in a temporary folder named by its owner (which the next write
        removes if this process is killed first: see [`~memit_hf.statistics.remove_stale_temporary_files`]),
        renamed over the checkpoint, with the permissions of a new file under the umask.

        Args:
            progress ([`CollectionProgress`]): the state after `progress.position` whole batches.
            num_batches (`int`): the length of this process's share, checked on load.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"total:{name}": total.detach().cpu().contiguous() for name, total in progress.totals.items()}
        tensors["count"] = torch.tensor([progress.count], dtype=torch.int64)
        metadata = {
            "format": str(CHECKPOINT_FORMAT_VERSION),
            "key": self.key,
            "position": str(progress.position),
            "num_batches": str(num_batches),
            "process_index": str(self.process_index),
            "num_processes": str(self.num_processes),
            "modules": json.dumps(sorted(progress.totals)),
            "sums": f"upper-blocks-{GRAM_BLOCKS}",
        }
        remove_stale_temporary_files(self.directory)
        with temporary_folder(self.path) as folder:
            save_tensors(tensors, folder / self.path.name, metadata=metadata)
            os.replace(folder / self.path.name, self.path)
        self.start(progress.position)
        return self.path

    def load(self, dims: dict[str, int], num_batches: int) -> CollectionProgress | None:
        """The saved progress of this process, or `None` when there is none or it does not fit (logged).

        Args:
            dims (`dict[str, int]`): the modules summed and their input sizes.
            num_batches (`int`): the length of this process's share.
        """
        if not self.path.exists():
            others = self.others()
            if others:
                logger.warning(
                    "Ignoring statistics checkpoints of another number of processes (%s): this run of %d process(es) "
                    "starts afresh.",
                    ", ".join(path.name for path in others),
                    self.num_processes,
                )
            return None
        try:
            with safe_open(str(self.path), framework="pt") as handle:
                meta = handle.metadata() or {}
                expected = {
                    "format": str(CHECKPOINT_FORMAT_VERSION),
                    "key": self.key,
                    "num_batches": str(num_batches),
                    "process_index": str(self.process_index),
                    "num_processes": str(self.num_processes),
                    "modules": json.dumps(sorted(dims)),
                    "sums": f"upper-blocks-{GRAM_BLOCKS}",
                }
                wrong = sorted(name for name, value in expected.items() if meta.get(name) != value)
                if wrong:
                    raise ValueError(f"different {wrong}")
                totals = {name: handle.get_tensor(f"total:{name}") for name in dims}
                count = int(handle.get_tensor("count").item())
            position = int(meta["position"])
            for name, total in totals.items():
                if total.dtype != torch.float64 or tuple(total.shape) != (dims[name], dims[name]):
                    raise ValueError(f"unexpected sum of {name}: {total.dtype} {tuple(total.shape)}")
            if not 0 <= position <= num_batches or count < 0:
                raise ValueError(f"position {position} of {num_batches}, count {count}")
        except Exception as error:  # a damaged checkpoint costs a fresh start, never a wrong result
            logger.warning("Ignoring unusable statistics checkpoint %s (%s); starting afresh.", self.path, error)
            return None
        return CollectionProgress(totals, count, position)

    def others(self) -> list[Path]:
        """Checkpoint files of the same collection written by runs with another number of processes."""
        same_world = f"-of-{self.num_processes}{CHECKPOINT_SUFFIX}"
        candidates = self.directory.glob(f"collection-{self.key}.rank*{CHECKPOINT_SUFFIX}")
        return sorted(path for path in candidates if not path.name.endswith(same_world))

    def remove(self, others: bool = False) -> None:
        """Delete this process's checkpoint (once the final statistics are cached).

        Args:
            others (`bool`, *optional*, defaults to `False`): also delete the checkpoints of runs with another number
                of processes (the main process does, once the statistics they were collecting are cached).
        """
        self.path.unlink(missing_ok=True)
        if others:
            for path in self.others():
                path.unlink(missing_ok=True)
