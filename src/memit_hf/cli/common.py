"""Helpers shared by the `memit-hf` commands."""

import json
from pathlib import Path
from typing import Any

from ..arguments import EditingArguments


def load_model(path: str | None, args: EditingArguments):
    """The `--model` of a command (the embedded default model when `None`) and its tokenizer. Without a
    `device_map` in `--model_init_kwargs`, the model goes to this process's accelerator when there is one (under
    `accelerate launch`, each process's own GPU), as `Trainer` places it."""
    from ..distributed import process_state
    from ..models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(path, args.model_init_kwargs)
    device = process_state().device
    if "device_map" not in (args.model_init_kwargs or {}) and device.type != "cpu":
        model = model.to(device)
    return model, tokenizer


def corpus_paths(corpus: list[str] | None) -> list[Path] | None:
    """The `--corpus` files, checked to exist."""
    if corpus is None:
        return None
    paths = [Path(item) for item in corpus]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise SystemExit(f"memit-hf: error: --corpus files not found: {missing}")
    return paths


def jsonable(value: Any) -> Any:
    """`value` as plain JSON types (anything else becomes its `str`)."""
    return json.loads(json.dumps(value, default=str))
