"""Shareable statistics: push cached statistics to a Hugging Face Hub dataset repository with a card, and fetch
statistics from a repository or a local folder into the cache, refusing those that do not match the model."""

import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..files import file_sha256
from .cache import StatisticsCache, entry_name, link_or_copy, read_second_moment, statistics_problems
from .fingerprint import fingerprint_differences, fingerprint_key


logger = logging.getLogger(__name__)

STATISTICS_REPO_TYPE = "dataset"
"""Statistics are data, shared as Hub dataset repositories."""
SETTINGS_FIELDS = ("num_tokens", "max_length", "seed")
"""Collection settings that choose between several matching statistics of one module in a repository."""


COMMIT_PATTERN = re.compile(r"[0-9a-f]{40}")
"""A full commit sha: the name of a Hub snapshot folder."""
HUB_ID_HELP = "a Hub repository id is `name` or `namespace/name` (letters, digits, `-`, `_` and `.`)"


class StatisticsMismatchError(ValueError):
    """Statistics from `stats_repo` that do not fit the model (another model, dtype, weights or layer) or whose
    content is unsound (a wrong checksum, token count or matrix)."""


@dataclass(frozen=True)
class FetchedStatistics:
    """Statistics fetched from `stats_repo` into the cache, and where they came from.

    Args:
        fingerprint (`dict`): their fingerprint (read them with [`StatisticsCache.load`]).
        repo (`str`): the Hub repository id, or the name of the local folder (never its path).
        revision (`str`, *optional*): the commit sha of the Hub snapshot they came from; `None` for a local folder.
        sha256 (`str`): the SHA-256 of their safetensors file, as checked.
    """

    fingerprint: dict[str, Any]
    repo: str
    revision: str | None
    sha256: str

    def provenance(self) -> dict[str, Any]:
        """`repo`, `revision` and `sha256`, as recorded in the edit metadata (see
        [`~memit_hf.statistics.LayerStatistics.info`])."""
        return {"repo": self.repo, "revision": self.revision, "sha256": self.sha256}


def _looks_like_path(text: str) -> str | None:
    """Why `text` is taken for a path (see [`resolve_stats_repo`]), or `None`."""
    for prefix in ("/", "./", "../", "~"):
        if text.startswith(prefix):
            return f"it starts with `{prefix}`"
    if text in (".", ".."):
        return f"it is `{text}`"
    if text.endswith(("/", os.sep)):
        return "it ends with a path separator"
    if "\\" in text:
        return "it contains a backslash"
    if text.count("/") > 1:
        return "it has more than one `/`"
    if "/" in text and Path(text.split("/")[0]).is_dir():
        return f"`{text.split('/')[0]}` is a local folder"
    return None


def resolve_stats_repo(source: str | os.PathLike) -> Path | str:
    """What `stats_repo` names: a local folder or a Hub repository id.

    It is a path when it is an `os.PathLike`, is an existing folder, or looks like a path: it starts with `/`,
    `./`, `../` or `~`, ends with a separator, contains a backslash, has more than one `/`, or its first component
    is a local folder. Anything else must be a Hub repository id (`name` or `namespace/name`, see
    `huggingface_hub.utils.validate_repo_id`).

    Args:
        source (`str` or `os.PathLike`): the `stats_repo` value.

    Returns:
        `Path` (the folder, `~` expanded) or `str` (the repository id).

    Raises:
        FileNotFoundError: when it looks like a path but is not a folder.
        ValueError: when it is empty, or neither looks like a path nor is a valid Hub repository id.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    text = os.fspath(source)
    if not text:
        raise ValueError(f"`stats_repo` is empty: give a folder of statistics or a Hub repository id ({HUB_ID_HELP}).")
    folder = Path(text).expanduser()
    if folder.is_dir():
        return folder
    reason = "it is a path object" if not isinstance(source, str) else _looks_like_path(text)
    if reason is not None:
        what = "a file, not a folder" if folder.exists() else "no such folder"
        raise FileNotFoundError(
            f"`stats_repo` {text!r} is taken for a local path ({reason}) but it is {what}. Give an existing folder "
            f"of statistics, or a Hub repository id: {HUB_ID_HELP}."
        )
    try:
        validate_repo_id(text)
    except HFValidationError as error:
        raise ValueError(
            f"`stats_repo` {text!r} is neither an existing folder nor a valid Hub repository id ({error}): "
            f"{HUB_ID_HELP}; a folder is an existing path such as `./stats`."
        ) from error
    return text


@dataclass
class StatisticsEntry:
    """One module's statistics in a folder: its metadata (the cache JSON) and its files.

    Args:
        meta (`dict`): `fingerprint`, `sha256`, `count` and optionally `info` (layer, corpus description).
        tensor_path (`Path`), meta_path (`Path`): the safetensors file and the JSON file.
    """

    meta: dict[str, Any]
    tensor_path: Path
    meta_path: Path

    @property
    def fingerprint(self) -> dict[str, Any]:
        return self.meta["fingerprint"]


def statistics_entries(folder: str | os.PathLike) -> list[StatisticsEntry]:
    """The statistics in `folder`: every `*.json` holding a fingerprint, with the safetensors file beside it (which
    need not be there yet: a Hub snapshot fetches it once chosen)."""
    entries = []
    for meta_path in sorted(Path(folder).glob("*.json")):
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and isinstance(meta.get("fingerprint"), dict) and "module" in meta["fingerprint"]:
            entries.append(StatisticsEntry(meta, meta_path.with_suffix(".safetensors"), meta_path))
    return entries


def _describe(differences: dict[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"{name}: {found!r} there, {expected!r} here" for name, (expected, found) in differences.items())


def select_statistics(
    entries: list[StatisticsEntry], expected: dict[str, dict[str, Any]], settings: dict[str, Any], source: str
) -> dict[str, StatisticsEntry]:
    """For each module, the entry whose fingerprint matches the model on every [`~memit_hf.statistics.MODEL_FIELDS`] field.

    Args:
        entries (`list[StatisticsEntry]`): what the repository or folder holds.
        expected (`dict[str, dict]`): by module name, the fingerprint of the model as it is (its `corpus` and
            settings fields are ignored: the statistics bring their own).
        settings (`dict`): `num_tokens`, `max_length` and `seed` preferred when several entries match a module.
        source (`str`): the repository or folder, for messages.

    Raises:
        StatisticsMismatchError: naming the module and, for each differing field, its value there and here, when a
            module has no entry or none that matches; or when several match and the settings do not choose one.
    """
    chosen = {}
    for module, fingerprint in expected.items():
        candidates = [entry for entry in entries if entry.fingerprint.get("module") == module]
        if not candidates:
            available = sorted({entry.fingerprint.get("module") for entry in entries})
            raise StatisticsMismatchError(
                f"`stats_repo` {source} has no statistics of `{module}` (it has {available or 'none'}): use "
                "statistics collected for the edited layers, or leave `stats_repo` unset to collect them."
            )
        matching = [entry for entry in candidates if not fingerprint_differences(fingerprint, entry.fingerprint)]
        if not matching:
            reasons = "\n".join(
                f"  - {entry.meta_path.name} (collected on `{entry.fingerprint.get('model')}`): "
                + _describe(fingerprint_differences(fingerprint, entry.fingerprint))
                for entry in candidates
            )
            raise StatisticsMismatchError(
                f"The statistics of `{module}` in `stats_repo` {source} do not match the model (`"
                f"{fingerprint.get('model')}`), so they are refused:\n{reasons}\nUse statistics collected on this "
                "model in this dtype, or leave `stats_repo` unset to collect them."
            )
        if len(matching) > 1:
            preferred = [e for e in matching if all(e.fingerprint.get(k) == settings.get(k) for k in SETTINGS_FIELDS)]
            if len(preferred) != 1:
                options = [{k: e.fingerprint.get(k) for k in SETTINGS_FIELDS} for e in matching]
                raise StatisticsMismatchError(
                    f"`stats_repo` {source} holds {len(matching)} statistics of `{module}` for this model, with "
                    f"settings {options}: set `stats_num_tokens`, `stats_max_length` and `seed` to choose one."
                )
            matching = preferred
        chosen[module] = matching[0]
    return chosen


def check_statistics_file(entry: StatisticsEntry, tensor_path: Path, source: str, dim: int | None = None) -> str:
    """Check statistics fetched from `stats_repo` before they enter the cache: the safetensors file's SHA-256
    against the JSON's, and its content (see [`~memit_hf.statistics.statistics_problems`]).

    Args:
        entry ([`StatisticsEntry`]): the JSON.
        tensor_path (`Path`): the safetensors file as fetched.
        source (`str`): the repository or folder, for messages.
        dim (`int`, *optional*): the input size `d_in` of the module the statistics are for.

    Returns:
        `str`: the file's SHA-256.

    Raises:
        StatisticsMismatchError: naming the file and what is wrong.
    """
    where = f"`stats_repo` {source}: {tensor_path.name}"
    sha256 = file_sha256(tensor_path)
    if sha256 != entry.meta.get("sha256"):
        raise StatisticsMismatchError(
            f"{where} has SHA-256 {sha256}, but {entry.meta_path.name} records {entry.meta.get('sha256')}: the file "
            "is damaged or does not belong to this JSON, so the statistics are refused."
        )
    try:
        moment = read_second_moment(tensor_path)
    except Exception as error:
        raise StatisticsMismatchError(f"{where} cannot be read as statistics: {error}.") from error
    problems = statistics_problems(moment, entry.meta, dim)
    if problems:
        raise StatisticsMismatchError(
            f"{where} holds unsound statistics, so they are refused: {'; '.join(problems)}. Collect them again, or "
            "leave `stats_repo` unset to collect them here."
        )
    return sha256


def _hub_api(token: str | None):
    from huggingface_hub import HfApi

    return HfApi(token=token)


def _snapshot(api, repo_id: str, revision: str | None, patterns: list[str]) -> Path:
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = api.snapshot_download(
            repo_id, repo_type=STATISTICS_REPO_TYPE, revision=revision, allow_patterns=patterns
        )
    except LocalEntryNotFoundError as error:
        raise FileNotFoundError(
            f"The statistics of `stats_repo` {repo_id} are not in the local Hub cache and the Hub cannot be reached "
            f"(HF_HUB_OFFLINE is set, or no network): {error}"
        ) from error
    return Path(folder)


def fetch_statistics(
    source: str | os.PathLike,
    expected: dict[str, dict[str, Any]],
    cache: StatisticsCache,
    settings: dict[str, Any] | None = None,
    revision: str | None = None,
    token: str | None = None,
    dims: dict[str, int] | None = None,
) -> dict[str, FetchedStatistics]:
    """Fetch the statistics of the modules in `expected` from a Hub dataset repository or a local folder into
    `cache`, after checking that they match the model and that their content is sound.

    Only the JSON files are fetched first; the chosen modules' tensors are fetched once every module matched, so
    refused statistics cost no download, and from the very commit the JSON files came from. Offline
    (`HF_HUB_OFFLINE=1`) a repository is read from the local Hub cache.

    Args:
        source (`str` or `os.PathLike`): an existing folder, or a Hub repository id (`"user/name"`): see
            [`resolve_stats_repo`].
        expected (`dict[str, dict]`): by module name, the fingerprint of the model as it is now.
        cache ([`StatisticsCache`]): where the files are put.
        settings (`dict`, *optional*): see [`select_statistics`].
        revision (`str`, *optional*): branch, tag or commit of the repository (pin a commit sha for statistics you
            did not make: the commit used is recorded either way).
        token (`str`, *optional*): Hub token.
        dims (`dict[str, int]`, *optional*): by module name, its input size `d_in`, which the statistics' side must
            equal.

    Returns:
        `dict[str, FetchedStatistics]`: by module name, the fingerprint of the statistics now in `cache` (read them
        with [`StatisticsCache.load`]) and where they came from: the repository id (or the folder's name), the
        commit and the file's SHA-256.

    Raises:
        StatisticsMismatchError: see [`select_statistics`] (raised before any tensor is fetched), and
            [`check_statistics_file`] (a damaged or unsound file, which is not put into the cache).
        FileNotFoundError: when the repository cannot be reached or lacks a file; see [`resolve_stats_repo`].
        ValueError: see [`resolve_stats_repo`].
    """
    resolved = resolve_stats_repo(source)
    api, commit = None, None
    if isinstance(resolved, Path):
        folder, name = resolved, resolved.resolve().name  # a folder's name only: no local path in the metadata
    else:
        api, name = _hub_api(token), resolved
        folder = _snapshot(api, resolved, revision, ["*.json"])
        if COMMIT_PATTERN.fullmatch(folder.name):
            commit = revision = folder.name  # the tensors from the very commit the JSON files came from
    chosen = select_statistics(statistics_entries(folder), expected, settings or {}, str(source))
    if api is not None:
        folder = _snapshot(api, name, revision, sorted(entry.tensor_path.name for entry in chosen.values()))
    fetched = {}
    for module, entry in chosen.items():
        tensor_path = folder / entry.tensor_path.name
        if not tensor_path.exists():
            raise FileNotFoundError(
                f"`stats_repo` {source} lists {entry.meta_path.name} but {tensor_path.name} is not there (with "
                "HF_HUB_OFFLINE set, only files already in the local Hub cache are found)."
            )
        sha256 = check_statistics_file(entry, tensor_path, str(source), (dims or {}).get(module))
        fingerprint = cache.add(tensor_path, entry.meta_path)
        fetched[module] = FetchedStatistics(fingerprint, name, commit, sha256)
    return fetched


def build_statistics_card(entries: list[dict[str, Any]], repo_id: str | None = None) -> str:
    """The README.md of a statistics repository: YAML metadata for the Hub, what the statistics are (model, layers,
    corpus, token count), the files, and how to use them.

    Args:
        entries (`list[dict]`): the cache JSON of every module (`fingerprint`, `count`, `info`).
        repo_id (`str`, *optional*): the repository, used in the snippets.

    Returns:
        `str`: the card.
    """
    from huggingface_hub import DatasetCardData

    from ..version import __version__

    entries = sorted(entries, key=lambda meta: (meta.get("info", {}).get("layer", 0), meta["fingerprint"]["module"]))
    first = entries[0]["fingerprint"]
    model = first.get("model") or "the model"
    layers = [meta.get("info", {}).get("layer") for meta in entries]
    layers = layers if all(layer is not None for layer in layers) else None
    corpus = entries[0].get("info", {}).get("corpus_description") or first.get("corpus")
    repo = repo_id or "path/to/this/folder"
    data = DatasetCardData(
        tags=["memit-hf", "model-editing", "knowledge-editing", "covariance-statistics"],
        pretty_name=f"memit-hf statistics of {model}",
    )
    rows = ["| layer | module | d_in | tokens | file | fingerprint key |", "| --- | --- | --- | --- | --- | --- |"]
    for meta in entries:
        fingerprint, info = meta["fingerprint"], meta.get("info", {})
        rows.append(
            f"| {info.get('layer', '?')} | `{fingerprint['module']}` | {info.get('dim', '?')} | {meta['count']:,} | "
            f"`{entry_name(fingerprint)}.safetensors` | `{fingerprint_key(fingerprint)}` |"
        )
    settings = ", ".join(f"{key} {first.get(key)}" for key in ("num_tokens", "max_length", "seed"))
    layers_arg = f"layers={layers}, " if layers else ""
    layers_flag = f" --layers {' '.join(map(str, layers))}" if layers else ""
    return "\n".join(
        [
            f"---\n{data.to_yaml()}\n---\n",
            f"# Second-moment statistics of {model}\n",
            f"Key second moments `C = E[k k^T]` of the inputs of the MLP down-projections of **{model}** "
            f"({first.get('model_type')}, {first.get('dtype')}, revision {first.get('revision') or 'unknown'}) at layers "
            f"{layers or [meta['fingerprint']['module'] for meta in entries]}, over **{entries[0]['count']:,} tokens** of "
            f"{corpus} (corpus identity `{first.get('corpus')}`; {settings}), collected with "
            f"[memit-hf](https://github.com/memit-hf/memit-hf) {__version__}. MEMIT, AlphaEdit and EMMET weigh every "
            "edit by them; collecting them is the longest step of a first edit, so they are shared here.\n",
            "## Files\n",
            "\n".join(rows) + "\n",
            "Each `.safetensors` file holds `total`, the float64 `(d_in, d_in)` sum of `k k^T` over all tokens (each "
            "batch's product in float32, summed in float64), and `count`, the number of tokens: `C = total / count`. The "
            "JSON file beside it holds the file's SHA-256 and the **fingerprint**: the model's identity, dtype and a "
            "digest of every weight the module's input depends on, the module, the tokenizer, the corpus identity and "
            f"the collection settings (format version {first.get('format_version')}).\n",
            "## How to use\n",
            f"""```python
from memit_hf import EditingArguments, Editor

args = EditingArguments({layers_arg}stats_repo="{repo}")
editor = Editor("{model}", args=args)
editor.edit(requests)  # the statistics are fetched, checked against the model and cached; no corpus needed
```

or `memit-hf edit --model {model}{layers_flag} --stats_repo {repo} --requests edits.jsonl --output-dir out`.
memit-hf refuses statistics whose fingerprint does not match the model (another model, dtype, weights or layer)
before any weight changes. Without memit-hf:

```python
from safetensors.torch import load_file

stats = load_file("{entry_name(first)}.safetensors")
C = stats["total"] / stats["count"]
```
""",
        ]
    )


def push_statistics(
    repo_id: str,
    fingerprints: list[dict[str, Any]],
    cache: StatisticsCache,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
) -> Any:
    """Upload the cached statistics of `fingerprints` (each module's safetensors and JSON files) with a card
    ([`build_statistics_card`]) to the Hub dataset repository `repo_id`, creating it if needed.

    Args:
        repo_id (`str`): `"user/name"` or `"org/name"`.
        fingerprints (`list[dict]`): the statistics to upload, all in `cache`.
        cache ([`StatisticsCache`]): where they are.
        private (`bool`, *optional*): visibility of a new repository (`None`: the account's default).
        token (`str`, *optional*): Hub token (`None`: the logged-in one or `HF_TOKEN`).
        commit_message (`str`, *optional*): defaults to "Upload memit-hf statistics of N modules".
        revision (`str`, *optional*): branch to push to.

    Returns:
        `huggingface_hub.CommitInfo`: the upload's commit.

    Raises:
        FileNotFoundError: if a statistic is not in the cache.
    """
    entries = []
    with tempfile.TemporaryDirectory(prefix="memit-stats-") as folder:
        for fingerprint in fingerprints:
            tensor_path, meta_path = cache.paths(fingerprint)
            if cache.load(fingerprint) is None:
                raise FileNotFoundError(f"The statistics of `{fingerprint['module']}` are not in {cache.directory}.")
            for path in (tensor_path, meta_path):
                link_or_copy(path, Path(folder) / path.name)
            entries.append(json.loads(meta_path.read_text(encoding="utf-8")))
        (Path(folder) / "README.md").write_text(build_statistics_card(entries, repo_id), encoding="utf-8")
        api = _hub_api(token)
        repo = api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type=STATISTICS_REPO_TYPE)
        return api.upload_folder(
            folder_path=folder,
            repo_id=getattr(repo, "repo_id", repo_id),
            repo_type=STATISTICS_REPO_TYPE,
            commit_message=commit_message or f"Upload memit-hf statistics of {len(entries)} modules",
            revision=revision,
        )
