"""Model cards for edit adapters and merged checkpoints, and pushing a folder to the Hugging Face Hub (exactly the
files of an export, with no local path in what is published)."""

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

from .algorithms.registry import ALGORITHM_CONFIGS


logger = logging.getLogger(__name__)

MAX_CARD_ROWS = 100
"""Edits listed in a model card's table; the rest are counted (all of them are in `memit_edits.json`)."""

CITATION = """@inproceedings{meng2023memit,
  title     = {Mass-Editing Memory in a Transformer},
  author    = {Kevin Meng and Arnab Sen Sharma and Alex Andonian and Yonatan Belinkov and David Bau},
  booktitle = {The Eleventh International Conference on Learning Representations (ICLR)},
  year      = {2023}
}"""


_LOCAL_PATH = re.compile(r"(?<![\w.~/\\-])(?:~[\\/]|[A-Za-z]:[\\/]|/(?!/))[^\s,;|'\"()\[\]{}<>`]*")
"""An absolute (or home-relative) local path inside a text: `/...` not part of a URL (`https://`) or of a Hub id
(`org/name`), `~/...`, `C:\\...`."""


def is_local_path(name: Any) -> bool:
    """Whether `name` (a `base_model_name_or_path`) is a local path that means nothing on the Hub: absolute,
    home-relative (`~/`) or explicitly relative (`./`, `../`)."""
    if not isinstance(name, str) or not name:
        return False
    return (
        os.path.isabs(name)
        or name.startswith(("~", "./", "../", ".\\", "..\\"))
        or re.match(r"^[A-Za-z]:[\\/]", name) is not None
    )


def hide_local_paths(text: str) -> str:
    """`text` with every absolute local path in it replaced by its last component (a file or folder name), e.g.
    `"stats_repo:/home/me/stats"` -> `"stats_repo:stats"`; URLs and Hub ids are kept."""

    def name(match: re.Match) -> str:
        last = re.split(r"[\\/]", match.group(0).rstrip("/\\"))[-1]
        return last or match.group(0)

    return _LOCAL_PATH.sub(name, text)


def public_base_model(name: str | None) -> str | None:
    """`name` as a published adapter or card may name its base model: `None` for a local path."""
    return None if is_local_path(name) else name


def warn_local_base_model(name: str) -> None:
    """Warn that the published files name no base model because `name` is a local path."""
    logger.warning(
        "The base model is the local path %s, which means nothing on the Hub: what is published names no base model "
        "(`base_model_name_or_path` is null in adapter_config.json and memit_edits.json, the model card has no "
        '`base_model`). Pass `base_model_name_or_path="<hub id>"` to name it.',
        name,
    )


def _hide_in(value: Any) -> Any:
    if isinstance(value, str):
        return hide_local_paths(value)
    if isinstance(value, dict):
        return {
            key: item if key == "requests" and isinstance(item, list) else _hide_in(item)
            for key, item in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [_hide_in(item) for item in value]
    return value


def public_metadata(metadata: dict[str, Any], warn: bool = True) -> dict[str, Any]:
    """A copy of the edit metadata (`memit_edits.json`) fit to publish: a local `base_model_name_or_path` becomes
    `None` and every other absolute local path (the export folder, corpus and request files, a local `stats_repo`)
    is cut to its last component. The requests are kept as they are.

    Args:
        metadata (`dict`): the metadata.
        warn (`bool`, *optional*, defaults to `True`): warn when the base model was a local path.

    Returns:
        `dict`: the metadata to publish.
    """
    base = metadata.get("base_model_name_or_path")
    public = {**_hide_in(metadata), "base_model_name_or_path": public_base_model(base)}
    if warn and is_local_path(base):
        warn_local_base_model(base)
    return public


def _cell(value: Any) -> str:
    text = "" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ").strip()


def _edits_table(requests: list[dict[str, Any]]) -> str:
    if not requests:
        return "_The requests were not stored; see `memit_edits.json` for their count and hash._\n"
    lines = ["| # | subject | prompt | new target | previous target |", "| --- | --- | --- | --- | --- |"]
    for i, request in enumerate(requests[:MAX_CARD_ROWS]):
        prompt = request["prompt"].replace("{}", "_{}_".format(request["subject"]))
        lines.append(
            f"| {i} | {_cell(request['subject'])} | {_cell(prompt)} | {_cell(request['target_new'])} | "
            f"{_cell(request.get('target_true'))} |"
        )
    if len(requests) > MAX_CARD_ROWS:
        lines.append(f"\n... and {len(requests) - MAX_CARD_ROWS} more edits, all listed in `memit_edits.json`.")
    return "\n".join(lines) + "\n"


def _front_matter(base_model: str | None, merged: bool) -> str:
    from huggingface_hub import ModelCardData

    tags = ["memit-hf", "memit", "model-editing", "knowledge-editing"]
    if not merged:
        tags.append("lora")
        if base_model:
            tags.append(f"base_model:adapter:{base_model}")
    tags.append("transformers")
    data = ModelCardData(
        base_model=base_model,
        library_name="transformers" if merged else "peft",
        pipeline_tag="text-generation",
        tags=tags,
    )
    return f"---\n{data.to_yaml()}\n---\n"


def _usage(repo: str, base_model: str | None, merged: bool) -> str:
    base = base_model or "<base model id>"
    if merged:
        return f"""```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo}")
tokenizer = AutoTokenizer.from_pretrained("{repo}")
```
"""
    return f"""With peft:

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained("{base}")
model = PeftModel.from_pretrained(base, "{repo}")
with model.disable_adapter():
    ...  # the unedited model
merged = model.merge_and_unload()  # the edited model as plain transformers weights
```

With transformers alone (peft installed): `AutoModelForCausalLM.from_pretrained("{repo}")`, or
`base.load_adapter("{repo}")` on a loaded base model. With memit-hf: `memit_hf.load_edits(base, "{repo}")`.
"""


def _settings(config: dict[str, Any] | None) -> str:
    return ", ".join(f"{key}={value}" for key, value in (config or {}).items()) or "-"


def _paper(name: str) -> str:
    return (ALGORITHM_CONFIGS.get(name) or ALGORITHM_CONFIGS["memit"]).paper


def _method(metadata: dict[str, Any]) -> str:
    rows = [
        "| batch | algorithm | edits | layers | method hyperparameters | statistics |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for i, batch in enumerate(metadata.get("batches", [])):
        hyper = batch.get("hyperparameters", {})
        stats = batch.get("statistics", {})
        first = next(iter(stats.values()), {})
        source = f"{first.get('corpus', '?')}, {first.get('num_tokens', '?')} tokens" if first else "?"
        settings = hide_local_paths(_settings(hyper.get("algorithm_config")))
        rows.append(
            f"| {i} | {batch.get('algorithm', '?')} | {batch.get('num_requests', '?')} | {hyper.get('layers')} | "
            f"{_cell(settings)} | {_cell(hide_local_paths(source))} |"
        )
    return "\n".join(rows) + "\n"


def build_model_card(metadata: dict[str, Any], repo_id: str | None = None, merged: bool = False) -> str:
    """The README.md of an edit adapter (or merged checkpoint): YAML metadata the Hub reads (`base_model`,
    `library_name`, `tags`), the edits as a table, the method and its settings, how to load it, and the citation.

    The card prints no local path: a base model loaded from a local folder is not named in the YAML metadata or the
    loading snippets (only its folder name in the text), and file paths in the statistics column are cut to their
    file names.

    Args:
        metadata (`dict`): the content of `memit_edits.json` (see [`Editor.save_adapter`]).
        repo_id (`str`, *optional*): the repository the card is for, used in the loading snippets.
        merged (`bool`, *optional*, defaults to `False`): whether the folder holds a merged checkpoint.

    Returns:
        `str`: the model card.
    """
    local_base = metadata.get("base_model_name_or_path")
    base_model = public_base_model(local_base)
    requests = [request for batch in metadata.get("batches", []) for request in batch.get("requests") or []]
    num_edits = sum(batch.get("num_requests", 0) for batch in metadata.get("batches", []))
    algorithms = sorted({batch.get("algorithm", "memit") for batch in metadata.get("batches", [])})
    paper = ", ".join(f"[{name.upper()}]({_paper(name)})" for name in algorithms or ["memit"])
    kind = "a merged checkpoint of" if merged else "a LoRA adapter for"
    if base_model:
        base_link = f"[{base_model}](https://huggingface.co/{base_model})"
    elif local_base:
        folder = PurePosixPath(local_base.replace("\\", "/")).name or local_base
        base_link = f"its base model (loaded from a local folder, `{folder}`)"
    else:
        base_link = "its base model"
    exact = metadata.get("export", {})
    error = exact.get("max_reconstruction_error")
    fidelity = (
        ""
        if merged or error is None
        else f"\nThe adapter stores the update {'exactly' if error < 1e-5 else f'with relative error {error:.2e}'} "
        f"(ranks {sorted(set(exact.get('ranks', {}).values()))}, {exact.get('adapter_bytes', 0) / 1e6:.1f} MB).\n"
    )
    sections = [
        _front_matter(base_model, merged),
        f"# {repo_id.split('/')[-1] if repo_id else 'Fact edits'}\n",
        f"This is {kind} {base_link} with **{num_edits} factual edits** made by {paper} "
        f"(mass-editing memory in a transformer) with [memit-hf](https://github.com/memit-hf/memit-hf) "
        f"{metadata.get('memit_hf_version', '')}: the MLP down-projections of the listed layers were rewritten so the "
        "model states the new facts below.\n" + fidelity,
        "## Edits\n",
        _edits_table(requests),
        "## How to load\n",
        _usage(repo_id or "path/to/this/folder", base_model, merged),
        "## Method\n",
        _method(metadata),
        "\nEvery hyperparameter, the statistics fingerprints and the requests are in `memit_edits.json`. Batches edited "
        "one after another form an ordered stack: each was computed with the earlier ones applied.\n",
    ]
    metrics = [batch.get("metrics", {}) for batch in metadata.get("batches", [])]
    quality = [m for m in metrics if "efficacy_success" in m]
    if quality:
        rows = ["| batch | efficacy | paraphrase | neighborhood | score |", "| --- | --- | --- | --- | --- |"]
        for i, m in enumerate(quality):
            rows.append(
                f"| {i} | {m['efficacy_success']:.1f} | {m.get('paraphrase_success', float('nan')):.1f} | "
                f"{m.get('neighborhood_success', float('nan')):.1f} | {m.get('score', float('nan')):.1f} |"
            )
        sections += ["## Evaluation (CounterFact metrics, percent)\n", "\n".join(rows) + "\n"]
    sections += ["## Citation\n", f"```bibtex\n{CITATION}\n```\n"]
    return "\n".join(sections)


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
        public = _hide_in(content)  # edit_metrics.json: paths in the resolved arguments
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
