"""memit-hf: mass-edit the factual knowledge of Hugging Face causal language models.

The public names are imported on first access, so that `import memit_hf` (and the `memit-hf --help` command) stays
fast and has no side effects: torch and transformers load only when `Editor` or `load_requests` is used.
"""

from typing import TYPE_CHECKING

from .version import __version__


_EXPORTS = {
    "EditOutput": "history",
    "Editor": "editor",
    "EditorCallback": "callbacks",
    "EditingArguments": "arguments",
    "EditRequest": "requests",
    "ExportReport": "export",
    "combine_edits": "loading",
    "load_edits": "loading",
    "load_metric": "metrics",
    "load_requests": "requests",
}

__all__ = [
    "EditOutput",
    "EditRequest",
    "EditingArguments",
    "Editor",
    "EditorCallback",
    "ExportReport",
    "__version__",
    "combine_edits",
    "load_edits",
    "load_metric",
    "load_requests",
]

if TYPE_CHECKING:
    from .arguments import EditingArguments
    from .callbacks import EditorCallback
    from .editor import Editor
    from .export import ExportReport
    from .history import EditOutput
    from .loading import combine_edits, load_edits
    from .metrics import load_metric
    from .requests import EditRequest, load_requests


def __getattr__(name: str) -> object:
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
