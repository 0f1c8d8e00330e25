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

from .cache import StatisticsCache, entry_name, link_or_copy
from .fingerprint import fingerprint_differences, fingerprint_key


logger = logging.getLogger(__name__)

STATISTICS_REPO_TYPE = "dataset"
"""Statistics are data, shared as Hub dataset repositories."""
SETTINGS_FIELDS = ("num_tokens", "max_length", "seed")
"""Collection settings that choose between several matching statistics of one module in a repository."""


class StatisticsMismatchError(ValueError):
    """Statistics from `stats_repo` that do not fit the model: another model, dtype, weights or layer."""


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
) -> dict[str, dict[str, Any]]:
    """Fetch the statistics of the modules in `expected` from a Hub dataset repository or a local folder into
    `cache`, after checking that they match the model.

    Only the JSON files are fetched first; the chosen modules' tensors are fetched once every module matched, so
    refused statistics cost no download. Offline (`HF_HUB_OFFLINE=1`) a repository is read from the local Hub cache.

    Args:
        source (`str` or `os.PathLike`): an existing folder, or a Hub repository id (`"user/name"`).
        expected (`dict[str, dict]`): by module name, the fingerprint of the model as it is now.
        cache ([`StatisticsCache`]): where the files are put.
        settings (`dict`, *optional*): see [`select_statistics`].
        revision (`str`, *optional*): branch, tag or commit of the repository.
        token (`str`, *optional*): Hub token.

    Returns:
        `dict[str, dict]`: by module name, the fingerprint of the statistics now in `cache` (read them with
        [`StatisticsCache.load`]).

    Raises:
        StatisticsMismatchError: see [`select_statistics`] (raised before any tensor is fetched).
        FileNotFoundError: when the repository cannot be reached or lacks a file.
    """
    folder = Path(source)
    api = None
    if not folder.is_dir():
        text = str(source)
        if os.path.isabs(text) or text.startswith((".", "~")) or text.count("/") > 1 or folder.exists():
            raise FileNotFoundError(f"`stats_repo` {text} is neither a folder of statistics nor a Hub repository id.")
        api = _hub_api(token)
        folder = _snapshot(api, str(source), revision, ["*.json"])
        if re.fullmatch(r"[0-9a-f]{40}", folder.name):
            revision = folder.name  # the tensors from the very commit the JSON files came from
    chosen = select_statistics(statistics_entries(folder), expected, settings or {}, str(source))
    if api is not None:
        folder = _snapshot(api, str(source), revision, sorted(entry.tensor_path.name for entry in chosen.values()))
    fetched = {}
    for module, entry in chosen.items():
        tensor_path = folder / entry.tensor_path.name
        if not tensor_path.exists():
            raise FileNotFoundError(
                f"`stats_repo` {source} lists {entry.meta_path.name} but {tensor_path.name} is not there (with "
                "HF_HUB_OFFLINE set, only files already in the local Hub cache are found)."
            )
        fetched[module] = cache.add(tensor_path, entry.meta_path)
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

    from .. import __version__

    entries = sorted(entries, key=lambda meta: (meta.get("info", {}).get("layer", 0), meta["fingerprint"]["module"]))
    first = entries[0]["fingerprint"]
    model = first.get("model") or "the model"
    layers = [meta.get("info", {}).get("layer") for meta in entries]
    layers = layers if all(layer is not None for layer in layers) else None
    corpus = entries[0].get("info", {}).get("corpus_description") or first.get("corpus")
    repo = repo_id or "path/to/this/folder"
    data = DatasetCardData(tags=["memit-hf", "model-editing", "knowledge-editing", "covariance-statistics"],
                           pretty_name=f"memit-hf statistics of {model}")  # fmt: skip
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
    return "\n".join([
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
    ])  # fmt: skip


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
