"""Helpers shared by the benchmark scripts: paths, device, model loading, memory and plotting set-up."""

import json
import os
import platform
import resource
from pathlib import Path
from typing import Any


REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
WIKITEXT = [
    str(SHARED / "corpus" / "wikitext-2-raw.valid.txt"),
    str(SHARED / "corpus" / "wikitext-2-raw.test.txt"),
]
HELD_OUT = [str(SHARED / "corpus" / "state_of_the_union.txt")]
"""Perplexity corpus: not used for the statistics, so it is held out from them."""


def setup() -> None:
    """Offline and no progress bars. The benchmarks import the installed `memit_hf` (`make venv` installs this
    checkout in editable mode)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(device: str, path: str | None = None):
    """SmolLM2-135M-Instruct (or the model at `path`: a `.gguf` file, a folder or a Hub id) in float32 on `device`,
    and its tokenizer."""
    from memit_hf.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(path)
    return model.to(device), tokenizer


def machine(device: str) -> dict[str, Any]:
    import torch

    info = {
        "device": device,
        "cpu": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def reset_peak_memory(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(torch.device(device))


def peak_memory_gb(device: str) -> float:
    """Peak GPU memory allocated since the last reset on CUDA, else the process's peak resident memory."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(torch.device(device)) / 1024**3
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def corpus_option(values: list[str]) -> list[str] | None:
    """`--corpus none` selects the offline default (text sampled from the model); otherwise the files must exist."""
    if values == ["none"]:
        return None
    missing = [value for value in values if not Path(value).is_file()]
    if missing:
        raise SystemExit(f"corpus files not found: {missing}")
    return values


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write `data` as indented JSON to `path`, atomically: a temporary file beside it, then `os.replace`, so that a
    run killed while writing leaves the previous file whole (what the resumable benchmarks rely on)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def previous_runs(path: str, append: bool, replaced: set[int]) -> list[dict]:
    """With `append`, the runs already in the JSON at `path` whose `num_edits` is not in `replaced` (so that sizes can
    be measured in separate calls, e.g. within a time limit per command); otherwise none."""
    if not append or not Path(path).exists():
        return []
    runs = json.loads(Path(path).read_text(encoding="utf-8")).get("runs", [])
    return [run for run in runs if run["num_edits"] not in replaced]


def pyplot():
    """matplotlib's pyplot with the non-interactive Agg backend (`pip install memit-hf[benchmarks]`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fmt(value: float | None, digits: int = 1) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def parse_value(text: str) -> Any:
    """A command-line `FIELD=VALUE` value: `true` / `false` (any case) as booleans, `none` / `null` as `None`, integers,
    floats (`1e-2` included), a `[...]` or `{...}` as YAML (lists such as `layers=[3,4,5]`), anything else as the
    string itself.

    Args:
        text (`str`): the value as typed.

    Returns:
        `Any`: the parsed value.
    """
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if text.strip().startswith(("[", "{")):
        import yaml

        return yaml.safe_load(text)
    return text


def field_values(items: list[str], where: str) -> dict[str, Any]:
    """`FIELD=VALUE` items of the command line as a flat mapping, each value read by [`parse_value`].

    Raises:
        SystemExit: naming `where` and the item when one is not `FIELD=VALUE`.
    """
    values = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"{where}: `{item}` is not FIELD=VALUE.")
        values[name] = parse_value(text)
    return values


def add_variant_option(parser, help: str) -> None:
    """`--variant NAME [FIELD=VALUE ...]`, repeatable (a list of lists, `None` when not given)."""
    parser.add_argument(
        "--variant", nargs="+", action="append", default=None, metavar=("NAME", "FIELD=VALUE"), help=help
    )


def parse_settings(settings: list[str]) -> dict[str, Any]:
    """`FIELD=VALUE` pairs as a flat `EditingArguments` mapping (numbers, booleans, lists and `None` parsed as YAML)."""
    import yaml

    values = {}
    for setting in settings:
        name, _, text = setting.partition("=")
        values[name] = None if text.lower() == "none" else yaml.safe_load(text)
    return values


def add_statistics_options(parser) -> None:
    """`--corpus`, `--stats-tokens` and `--stats-cache-dir`: where the statistics come from (wikitext by default)."""
    parser.add_argument(
        "--corpus",
        nargs="+",
        default=WIKITEXT,
        help="Statistics corpus files (split at blank lines); `none` for the offline model-sampled source.",
    )
    parser.add_argument("--stats-tokens", type=int, default=408_567, help="Token budget of the statistics.")
    parser.add_argument("--stats-cache-dir", default=None, help="Reuse statistics from here (default: a fresh dir).")


def statistics_arguments(options) -> dict[str, Any]:
    """The flat editing arguments of the statistics options of [`add_statistics_options`]: the token budget and the
    cache folder (a fresh temporary one when `--stats-cache-dir` is not given)."""
    import tempfile

    cache_dir = options.stats_cache_dir or tempfile.mkdtemp(prefix="memit-stats-")
    return {"stats_num_tokens": options.stats_tokens, "stats_cache_dir": cache_dir}


def z_settings(args) -> str:
    """What the target values z depend on besides the model and the requests: every resolved editing argument but the
    method and its hyperparameters, and of the edited layers only the last (the z layer), so the z optimisation and
    the context templates, as a JSON key.

    Args:
        args ([`~memit_hf.EditingArguments`]): the resolved arguments of an editor (`editor.resolved_args`).

    Returns:
        `str`: equal for two variants exactly when the z one computed on a model can be reused by the other (two
        layer ranges that end at the same layer share their z).
    """
    values = {key: value for key, value in args.to_dict().items() if key not in ("algorithm", "algorithm_config")}
    values["layers"] = list(values["layers"])[-1:]  # z is optimised at the last edited layer only
    return json.dumps(values, sort_keys=True, default=str)


def values_file(values_dir: str | os.PathLike, requests: list, key: str) -> Path:
    """Where the z of `requests` under the z settings `key` (see [`z_settings`]) are kept: a file in `values_dir` named
    by a digest of both."""
    import hashlib

    text = json.dumps([[request.to_dict() for request in requests], key], sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()
    return Path(values_dir) / f"values-{len(requests)}-{digest[:16]}.safetensors"


def cached_values(editor, requests: list, values_dir: str | os.PathLike | None) -> tuple[Any, float, bool]:
    """The z of `requests` on `editor`'s model as it is now: read from `values_dir` when saved there for the same
    requests and z settings, else computed (and saved there when `values_dir` is given).

    Only for z of the unedited model (a file does not say which edits the model held).

    Returns:
        `tuple`: the [`~memit_hf.values.ValueResult`], the seconds its z optimisation took (when it was computed,
        possibly in an earlier session) and whether it was read from a file.
    """
    import time

    from memit_hf.value_files import load_values, load_values_metadata, save_values

    key = z_settings(editor.resolved_args)
    path = values_file(values_dir, requests, key) if values_dir else None
    if path is not None and path.is_file():
        return load_values(path), load_values_metadata(path)["seconds"], True
    tick = time.perf_counter()
    values = editor.compute_values(requests)
    seconds = time.perf_counter() - tick
    if path is not None:
        save_values(values, path, metadata={"seconds": seconds, "z_settings": key})
    return values, seconds, False
