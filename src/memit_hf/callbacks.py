"""Callbacks of the [`~memit_hf.Editor`], in the style of `transformers.TrainerCallback`."""

from typing import Any

from .deltas import LayerDelta
from .history import EditOutput
from .requests import EditRequest


class EditorCallback:
    """Base class for callbacks of [`~memit_hf.Editor`]; override the events you need (each receives
    the [`~memit_hf.Editor`] first)."""

    def on_edit_begin(self, editor: Any, requests: list[EditRequest]) -> None:
        pass

    def on_values_begin(self, editor: Any, requests: list[EditRequest]) -> None:
        """Called when the z optimisation starts (after statistics and validation; not when `values` are given)."""

    def on_layer_end(self, editor: Any, layer: int, delta: LayerDelta) -> None:
        pass

    def on_edit_end(self, editor: Any, output: EditOutput) -> None:
        pass
