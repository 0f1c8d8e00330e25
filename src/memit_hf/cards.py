"""Model cards for edit adapters and merged checkpoints, and the public form of their metadata (no local path in what
is published)."""

import logging
import os
import re
from pathlib import PurePosixPath
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


def hide_local_paths_in(value: Any) -> Any:
    """A copy of `value` (nested dicts, lists and strings) with [`hide_local_paths`] applied to every string."""
    if isinstance(value, str):
        return hide_local_paths(value)
    if isinstance(value, dict):
        return {
            key: item if key == "requests" and isinstance(item, list) else hide_local_paths_in(item)
            for key, item in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [hide_local_paths_in(item) for item in value]
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
    public = {**hide_local_paths_in(metadata), "base_model_name_or_path": public_base_model(base)}
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
