"""The update stage: per edited layer, the keys, the residual that layer must write, the method's solve and the exact
low-rank update, applied before the next layer's keys are read (MEMIT's spread, algorithm.md section 5)."""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .algorithms import EditAlgorithm, LayerProblem
from .architectures import ModelLayout
from .deltas import LayerDelta, make_delta
from .keys import KeyForwards
from .norms import rms_norm_residuals
from .requests import EditRequest
from .statistics import LayerStatistics
from .values import ValueResult


@dataclass
class LayerUpdates:
    """What [`solve_layers`] did.

    Args:
        deltas (`list[LayerDelta]`): the update of every edited module, in order.
        initial_outputs (`torch.Tensor`): `(n, d_model)` block outputs at the last edited layer before the first
            update (bare prompts, subject-last token).
        final_outputs (`torch.Tensor`): the same after the last update.
        rounding (`list[float]`): each update's merge rounding error (see [`~memit_hf.deltas.add_delta`]).
    """

    deltas: list[LayerDelta]
    initial_outputs: torch.Tensor
    final_outputs: torch.Tensor
    rounding: list[float]

    def residual_achieved(self, targets: torch.Tensor) -> float:
        """The mean fraction of each request's target residual at the last edited layer that the updates deliver."""
        wanted = (targets - self.initial_outputs).norm(dim=1)
        missed = (targets - self.final_outputs).norm(dim=1)
        return float((1 - missed / wanted.clamp_min(1e-12)).mean())


def through_post_mlp_norm(
    model: PreTrainedModel, layout: ModelLayout, layer: int, residuals: torch.Tensor, edit_outputs: torch.Tensor
) -> torch.Tensor:
    """Map block-output residuals `(n, d)` to the edited projection's output space when an RMS norm sits between
    them (Gemma 2/3, OLMo 2); see [`~memit_hf.norms.rms_norm_residuals`]."""
    name = layout.post_mlp_norm_name(layer)
    if name is None:
        return residuals
    return rms_norm_residuals(model.get_submodule(name), residuals, edit_outputs)


def solve_layers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    layout: ModelLayout,
    requests: list[EditRequest],
    templates: list[list[str]],
    targets: torch.Tensor,
    statistics: dict[str, LayerStatistics],
    algorithm: EditAlgorithm,
    layers: list[int],
    apply: Callable[[LayerDelta], float],
    on_layer: Callable[[int, LayerDelta], None] | None = None,
) -> LayerUpdates:
    """Solve and apply the layers in order: each layer writes its share of what is left of the target residual.

    Args:
        model, tokenizer, layout: the model being edited.
        requests (`list[EditRequest]`): the requests.
        templates (`list[list[str]]`): the context templates of the keys.
        targets (`torch.Tensor`): `(n, d_model)` float64 target values at the last layer of `layers`.
        statistics (`dict[str, LayerStatistics]`): the statistics of every edited module, by name.
        algorithm ([`~memit_hf.algorithms.EditAlgorithm`]): the method (prepared for `statistics`).
        layers (`list[int]`): the edited layers, ascending.
        apply (`Callable[[LayerDelta], float]`): applies one update to the model (returns its rounding error).
        on_layer (`Callable[[int, LayerDelta], None]`, *optional*): called after each layer's update is applied.

    Returns:
        [`LayerUpdates`]

    Raises:
        ValueError: when an update is not finite (nothing of it is applied).
    """
    z_layer = layers[-1]
    deltas, rounding = [], []
    initial_outputs = None
    forwards = KeyForwards(model, tokenizer, layout, requests, templates, z_layer)
    for i, layer in enumerate(layers):
        keys, current, edit_outputs = forwards.read(layer, return_edit_outputs=True)
        if initial_outputs is None:
            initial_outputs = current
        residuals = (targets - current) / (len(layers) - i)  # spread what is left over the remaining layers
        residuals = through_post_mlp_norm(model, layout, layer, residuals, edit_outputs)
        name = layout.edit_name(layer)
        lora_B, lora_A = algorithm.solve(LayerProblem(name, layer, keys, residuals, statistics[name]))
        if not (torch.isfinite(lora_B).all() and torch.isfinite(lora_A).all()):
            raise ValueError(f"The update of `{name}` is not finite.")
        delta = make_delta(name, model.get_submodule(name), lora_B, lora_A)
        rounding.append(apply(delta))
        deltas.append(delta)
        if on_layer is not None:
            on_layer(layer, delta)
    final_outputs = forwards.final_outputs()
    return LayerUpdates(deltas, initial_outputs, final_outputs, rounding)


def edit_metrics(
    values: ValueResult,
    updates: LayerUpdates,
    timings: dict[str, float],
    total_seconds: float,
    diagnostics: dict[str, float],
) -> dict[str, float]:
    """The metrics of one edit ([`~memit_hf.Editor.edit`]'s `EditOutput.metrics`).

    Args:
        values ([`~memit_hf.values.ValueResult`]): the target values of its requests.
        updates ([`LayerUpdates`]): what the update stage did.
        timings (`dict[str, float]`): the seconds of each stage (`*_seconds`).
        total_seconds (`float`): the whole edit's seconds.
        diagnostics (`dict[str, float]`): the method's figures ([`~memit_hf.algorithms.EditAlgorithm.diagnostics`]).

    Returns:
        `dict[str, float]`: counts, timings, the z losses and steps, `residual_achieved`, `merge_rounding_error` and
        the method's diagnostics.
    """
    return {
        "num_requests": float(values.targets.shape[0]),
        "num_layers": float(len(updates.deltas)),
        **timings,
        "total_seconds": total_seconds,
        "z_initial_loss": float(values.initial_loss.mean()),
        "z_final_loss": float(values.final_loss.mean()),
        "z_final_nll": float(values.final_nll.mean()),
        "z_mean_steps": float(values.steps.float().mean()),
        "residual_achieved": updates.residual_achieved(values.targets.double()),
        "merge_rounding_error": max(updates.rounding),
        **value_norm_metrics(values),
        **diagnostics,
    }


def value_norm_metrics(values: ValueResult) -> dict[str, float]:
    """With Norm-Anchor Scaling: the mean `||v*||` over the anchor before rescaling (`value_norm_ratio`) and the number
    of requests left unchanged (`value_norm_skipped`, `||v*||` above the skip multiple); empty without it."""
    if values.value_norm_ratio is None:
        return {}
    unchanged = (values.targets == values.initial).all(dim=1)
    return {
        "value_norm_ratio": float(values.value_norm_ratio.mean()),
        "value_norm_skipped": float(unchanged.sum()),
    }
