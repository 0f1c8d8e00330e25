"""Pushing a folder to the Hugging Face Hub: exactly the files of an export, with no local path in what is published
(the cards and the public metadata come from [`~memit_hf.cards`])."""

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

from .cards import (
    MAX_CARD_ROWS,
    build_model_card,
    hide_local_paths,
    hide_local_paths_in,
    is_local_path,
    public_base_model,
    public_metadata,
    warn_local_base_model,
)


logger = logging.getLogger(__name__)

__all__ = [
    "MAX_CARD_ROWS",
    "build_model_card",
    "default_push_files",
    "hide_local_paths",
    "hide_local_paths_in",
    "is_local_path",
    "public_base_model",
    "public_metadata",
    "push_folder",
    "stage_for_hub",
    "warn_local_base_model",
]


def _relative_file(name: str, folder: Path) -> PurePosixPath:
    relative = PurePosixPath(str(name).replace("\\", "/"))
    if not str(name) or relative.is_absolute() or ".." in relative.parts or re.match(r"^[A-Za-z]:", str(name)):
        raise ValueError(f"Files to push must be paths inside {folder}, got {name!r}.")
    return relative


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not supported
        shutil.copy2(source, target)


def default_push_files(folder: str | os.PathLike) -> list[str]:
    """What [`push_folder`] uploads from `folder` by default: the files its `memit_edits.json` lists (those the export
    wrote), else every file whose path has no hidden (`.`-prefixed) part.

    Args:
        folder (`str` or `os.PathLike`): the folder.

    Returns:
        `list[str]`: paths relative to `folder`.
    """
    from .export import read_edits_metadata

    folder = Path(folder)
    listed = (read_edits_metadata(folder) or {}).get("files")
    if isinstance(listed, list):
        return [str(name) for name in listed]
    return sorted(
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*")
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )


def stage_for_hub(
    folder: str | os.PathLike, files: Iterable[str], destination: str | os.PathLike, repo_id: str | None = None
) -> list[str]:
    """Put `files` of `folder` into the empty folder `destination` as they are to be published: hard links (or
    copies) of the files as they are, except the files that may name local paths, which are rewritten:
    `adapter_config.json` gets `base_model_name_or_path: null` when it is a local path, `memit_edits.json` becomes
    its [`public_metadata`] (when that differs), the model card `README.md` beside it is rebuilt from that (naming `repo_id`), and the
    paths in `edit_metrics.json` are cut to their last component. Warns once when the base model was a local path.

    Args:
        folder (`str` or `os.PathLike`): the folder the files are in.
        files (`Iterable[str]`): paths relative to `folder`.
        destination (`str` or `os.PathLike`): the staging folder.
        repo_id (`str`, *optional*): the repository the model card names.

    Returns:
        `list[str]`: the files staged, relative to `destination`.

    Raises:
        ValueError: for a path that is not inside `folder`.
        FileNotFoundError: for a listed file that `folder` does not hold.
    """
    from .export import ADAPTER_CONFIG_NAME, CARD_NAME, EDIT_METRICS_NAME, EDITS_METADATA_NAME, write_json

    folder, destination = Path(folder), Path(destination)
    relative = sorted({_relative_file(name, folder) for name in files})
    listed = set(relative)
    local_bases = []
    for name in relative:
        source, target = folder / name, destination / name
        if not source.is_file():
            raise FileNotFoundError(f"Cannot push {name}: {source} is not a file.")
        target.parent.mkdir(parents=True, exist_ok=True)
        if name.name == CARD_NAME and name.with_name(EDITS_METADATA_NAME) in listed:
            continue  # rebuilt from the metadata
        if name.name not in (EDITS_METADATA_NAME, ADAPTER_CONFIG_NAME, EDIT_METRICS_NAME):
            _link_or_copy(source, target)
            continue
        content = json.loads(source.read_text(encoding="utf-8"))
        public = hide_local_paths_in(content)  # edit_metrics.json: paths in the resolved arguments
        if isinstance(content, dict) and name.name != EDIT_METRICS_NAME:
            local_bases.append(content.get("base_model_name_or_path"))
            if name.name == EDITS_METADATA_NAME:
                public = public_metadata(content, warn=False)
            else:  # adapter_config.json: only its base model may be a local path
                public = {
                    **content,
                    "base_model_name_or_path": public_base_model(content.get("base_model_name_or_path")),
                }
        if public == content:
            _link_or_copy(source, target)
        else:
            write_json(target, public)
        if name.name == EDITS_METADATA_NAME and name.with_name(CARD_NAME) in listed:
            merged = not (source.parent / ADAPTER_CONFIG_NAME).is_file()
            target.with_name(CARD_NAME).write_text(build_model_card(public, repo_id, merged=merged), encoding="utf-8")
    local = next((base for base in local_bases if is_local_path(base)), None)
    if local is not None:
        warn_local_base_model(local)
    return [name.as_posix() for name in relative]


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
    files: Iterable[str] | None = None,
) -> Any:
    """Create `repo_id` if needed and upload exactly `files` of `folder` to it, as `Trainer.push_to_hub` does.

    The files are staged by [`stage_for_hub`] in a clean folder inside `folder` (in the system's temporary folder when
    `folder` is read-only) and that folder is uploaded: nothing else in `folder` (a `.env`, an older adapter, stale
    files) is published, and the published `adapter_config.json`, `memit_edits.json` and model card carry no local
    path.

    Args:
        folder (`str` or `os.PathLike`): the adapter or checkpoint directory.
        repo_id (`str`): `"user/name"` or `"org/name"`.
        private (`bool`, *optional*): visibility of a new repository (`None`: the account's default).
        token (`str`, *optional*): Hub token (`None`: the logged-in one or `HF_TOKEN`).
        commit_message (`str`, *optional*): defaults to "Upload fact edits with memit-hf".
        revision (`str`, *optional*): branch to push to.
        files (`Iterable[str]`, *optional*): the paths to upload, relative to `folder`; default:
            [`default_push_files`] (the files the folder's `memit_edits.json` lists, else every non-hidden file).

    Returns:
        `huggingface_hub.CommitInfo`: the upload's commit.

    Raises:
        FileNotFoundError: if `folder` is not a directory or lacks one of `files`.
        ValueError: for a path in `files` outside `folder`.
    """
    from huggingface_hub import HfApi

    from .export import staging_folder

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Nothing to push: {folder} is not a directory.")
    files = default_push_files(folder) if files is None else list(files)
    with contextlib.ExitStack() as stack:
        try:
            staging = stack.enter_context(staging_folder(folder))
        except OSError:  # a read-only folder
            staging = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="memit-hf-push-")))
        stage_for_hub(folder, files, staging, repo_id)
        api = HfApi(token=token)
        repo = api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
        return api.upload_folder(
            folder_path=str(staging),
            repo_id=getattr(repo, "repo_id", repo_id),
            repo_type="model",
            commit_message=commit_message or "Upload fact edits with memit-hf",
            revision=revision,
        )
