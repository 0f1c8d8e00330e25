"""Helpers shared by the `memit-hf` commands."""

import json
from pathlib import Path
from typing import Any

from ..arguments import EditingArguments


def _load_model(path: str | None, args: EditingArguments):
    if path is None:
        from ..models import load_default_model

        return load_default_model()
    from ..editor import load_model_and_tokenizer

    return load_model_and_tokenizer(path, args.model_init_kwargs)


def _corpus_paths(corpus: list[str] | None) -> list[Path] | None:
    if corpus is None:
        return None
    paths = [Path(item) for item in corpus]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise SystemExit(f"memit-hf: error: --corpus files not found: {missing}")
    return paths


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
