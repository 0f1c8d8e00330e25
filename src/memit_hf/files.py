"""Safe writes into folders that several processes, runs or users may share (the statistics cache, output and state
folders): files are written in a temporary folder named by its owner (host and process id) and renamed into place
with the umask's permissions (safetensors alone gives `0o600`), stale temporary folders and files of killed runs are
removed on the next write, and an exclusive per-entry lock is held while an entry is written."""

import contextlib
import errno
import hashlib
import logging
import os
import re
import secrets
import shutil
import socket
import stat
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


try:
    import fcntl
except ImportError:  # Windows: no `flock`, see `entry_lock`
    fcntl = None


logger = logging.getLogger(__name__)

TEMPORARY_MARKER = "memit-tmp"
"""What the name of every temporary folder memit-hf writes into a statistics folder holds, before its owner."""
STALE_TEMPORARY_SECONDS = 24 * 3600
"""Age (since the last modification) after which a temporary folder or file is removed whoever owns it."""
LOCK_SUFFIX = ".lock"
"""Suffix of an entry's lock file (removed again once the entry is written)."""

_OWNED = re.compile(rf"\.{TEMPORARY_MARKER}\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[0-9a-f]+\.tmp$")
# Temporary files that tell no owner (only their age tells that they are stale): those of earlier versions,
# `tempfile.NamedTemporaryFile(suffix=".tmp")` and `.<name>.<pid>.tmp`, and `.tmpXXXXXX`, which
# `safetensors.torch.save_file` writes beside its target before renaming it.
_UNOWNED = re.compile(r"tmp[a-z0-9_]{8}\.tmp|\..+\.\d+\.tmp|\.tmp[A-Za-z0-9]{6}")


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def host_name() -> str:
    """This machine's name as it appears in temporary file names: letters, digits and `-` only."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:64] or "localhost"


def temporary_path(target: str | os.PathLike) -> Path:
    """A fresh temporary name beside `target` that names its owner:
    `.<target name>.memit-tmp.<host>.<pid>.<random>.tmp` (see [`temporary_owner`])."""
    target = Path(target)
    name = f".{target.name}.{TEMPORARY_MARKER}.{host_name()}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    return target.parent / name


@contextlib.contextmanager
def temporary_folder(target: str | os.PathLike) -> Iterator[Path]:
    """A new folder beside `target`, named by its owner (see [`temporary_path`]), to write files in before renaming
    them into place; it is removed with what is left in it when the block ends. Every byte of a write, including
    the temporary file `safetensors` makes beside the file it saves, is in it: if the process is killed first,
    [`remove_stale_temporary_files`] finds it by its owner.

    Yields:
        `Path`: the folder (mode `0o777` less the umask).
    """
    while True:
        folder = temporary_path(target)
        try:
            folder.mkdir(mode=0o777)
            break
        except FileExistsError:  # another random part, however unlikely
            continue
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def new_file_mode(folder: str | os.PathLike) -> int:
    """The permissions of a new file under the umask, `0o666 & ~umask`, read from those of `folder` (made by
    [`temporary_folder`], `0o777 & ~umask`) rather than by setting the process-wide umask."""
    return stat.S_IMODE(os.stat(folder).st_mode) & 0o666


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, Any] | None = None):
    """`safetensors.torch.save_file` with the permissions of a normal new file (see [`new_file_mode`]) rather than
    the `0o600` it gives, which locks the other users of a shared cache out.

    Args:
        tensors (`dict[str, torch.Tensor]`), metadata (`dict`, *optional*): as for `save_file`.
        path (`str` or `os.PathLike`): the file, in a [`temporary_folder`].
    """
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, new_file_mode(Path(path).parent))


def temporary_owner(path: str | os.PathLike) -> tuple[str, int] | None:
    """The host and process id in the name of a temporary folder made by [`temporary_folder`] (or any name made by
    [`temporary_path`]), else `None`."""
    match = _OWNED.search(Path(path).name)
    return (match["host"], int(match["pid"])) if match else None


def process_alive(pid: int) -> bool:
    """Whether process `pid` of this machine runs (or may: `True` where that cannot be told, as on Windows, where
    `os.kill` would end it)."""
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, under another user
        return True
    return True


def remove_stale_temporary_files(
    directory: str | os.PathLike, max_age: float = STALE_TEMPORARY_SECONDS, now: float | None = None
) -> list[Path]:
    """Delete what runs killed in the middle of a write left in `directory`: the temporary folders (see
    [`temporary_folder`]) of processes of this machine that no longer run, and any temporary folder or file (of
    another machine, or whose name tells no owner: those of earlier memit-hf versions and of `safetensors`) not
    modified for `max_age` seconds. Those of running processes are kept.

    Args:
        directory (`str` or `os.PathLike`): the statistics folder (a missing one holds nothing).
        max_age (`float`, *optional*, defaults to `STALE_TEMPORARY_SECONDS` (24 h)): the age limit.
        now (`float`, *optional*): the current `time.time()`.

    Returns:
        `list[Path]`: what was removed.
    """
    now = time.time() if now is None else now
    here = host_name()
    removed = []
    try:
        paths = list(Path(directory).iterdir())
    except FileNotFoundError:
        return removed
    for path in paths:
        owner = temporary_owner(path)
        if owner is None and not _UNOWNED.fullmatch(path.name):
            continue
        try:
            age = now - path.lstat().st_mtime
        except FileNotFoundError:  # renamed or removed meanwhile
            continue
        dead = owner is not None and owner[0] == here and not process_alive(owner[1])
        if not dead and age <= max_age:
            continue
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:
            continue
        except OSError as error:  # another user's, in a sticky folder: leave it
            logger.debug("Cannot remove the stale temporary file %s: %s", path, error)
            continue
        logger.info("Removed the stale temporary file %s (left by a run that was stopped).", path)
        removed.append(path)
    return removed


def _open_lock_file(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:  # another user's lock file: `flock` works on a read-only descriptor too
        return os.open(path, os.O_RDONLY)


def _lock(path: Path) -> int | None:
    """An open descriptor of the lock file `path` holding its exclusive `flock`, or `None` where the file system
    cannot lock."""
    while True:
        descriptor = _open_lock_file(path)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        except OSError as error:
            os.close(descriptor)
            if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                with contextlib.suppress(OSError):
                    path.unlink()  # of no use
                return None
            raise
        except BaseException:
            os.close(descriptor)
            raise
        held = os.fstat(descriptor)
        try:
            current = os.stat(path)
            if (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
                return descriptor
        except FileNotFoundError:
            pass
        os.close(descriptor)  # the holder before us removed the file: lock the new one


@contextlib.contextmanager
def entry_lock(path: str | os.PathLike, use_flock: bool | None = None) -> Iterator[None]:
    """Hold an exclusive lock on the lock file `path` (created if needed) while the block runs, so that two
    processes writing the same statistics entry do not interleave their files; another writer waits.

    The lock file is deleted before the lock is released; a process that opened it meanwhile sees that it was
    replaced and locks the new one, so two processes never hold the lock at once.

    Args:
        path (`str` or `os.PathLike`): the lock file, e.g. `<entry>.lock`.
        use_flock (`bool`, *optional*): whether to lock with `fcntl.flock`; defaults to whether `fcntl` exists.
            Without it (Windows), or on a file system that cannot lock, nothing is locked and a `RuntimeWarning`
            says so: readers still verify each entry's checksum and content, so an entry damaged by interleaved
            writers is ignored and computed again, never used.
    """
    path = Path(path)
    if use_flock is None:
        use_flock = fcntl is not None
    descriptor = None
    if use_flock:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = _lock(path)
    if descriptor is None:
        reason = "the file system cannot lock" if use_flock else "`fcntl.flock` is not available on this platform"
        warnings.warn(
            f"Writes are not locked ({path}): {reason}. Two processes writing the same entry at once may leave it "
            "damaged (a statistics entry is then computed again; a state folder reads back as one writer's).",
            RuntimeWarning,
            stacklevel=3,
        )
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(OSError):  # another user's file in a sticky folder stays
            path.unlink()
        os.close(descriptor)
