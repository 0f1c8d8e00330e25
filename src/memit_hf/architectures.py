"""Where MEMIT looks inside each architecture: one table keyed by `config.model_type` (a leaf: it imports nothing
from memit-hf). The per-model hyperparameters live in [`~memit_hf.defaults`]."""

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D


@dataclass(frozen=True)
class ModelLayout:
    """Module names of one architecture.

    Args:
        layer_template (`str`):
            Name of decoder block `i`, e.g. `"model.layers.{}"`; its output is the residual stream edited by z.
        edit_template (`str`):
            Name of the MLP down-projection of block `i`, whose input is the key and whose weight is edited.
        layers_attr (`str`):
            Name of the `ModuleList` holding the blocks.
        post_mlp_norm_template (`str`, *optional*):
            RMS norm applied to the MLP output before it joins the residual stream (Gemma 2/3, OLMo 2). Residuals
            are mapped through its local inverse so the edited projection writes what the block output needs.
    """

    layer_template: str
    edit_template: str
    layers_attr: str
    post_mlp_norm_template: str | None = None

    def layer_name(self, layer: int) -> str:
        return self.layer_template.format(layer)

    def edit_name(self, layer: int) -> str:
        return self.edit_template.format(layer)

    def post_mlp_norm_name(self, layer: int) -> str | None:
        return self.post_mlp_norm_template.format(layer) if self.post_mlp_norm_template else None


def _layout(prefix: str, down_proj: str, post_mlp_norm: str | None = None) -> ModelLayout:
    norm = f"{prefix}.{{}}.{post_mlp_norm}" if post_mlp_norm else None
    return ModelLayout(f"{prefix}.{{}}", f"{prefix}.{{}}.{down_proj}", prefix, norm)


MODEL_TYPE_TO_LAYOUT: dict[str, ModelLayout] = {
    "gpt2": _layout("transformer.h", "mlp.c_proj"),
    "gptj": _layout("transformer.h", "mlp.fc_out"),
    "gpt_neo": _layout("transformer.h", "mlp.c_proj"),
    "gpt_neox": _layout("gpt_neox.layers", "mlp.dense_4h_to_h"),
    "llama": _layout("model.layers", "mlp.down_proj"),
    "mistral": _layout("model.layers", "mlp.down_proj"),
    "qwen2": _layout("model.layers", "mlp.down_proj"),
    "qwen3": _layout("model.layers", "mlp.down_proj"),
    "gemma": _layout("model.layers", "mlp.down_proj"),
    "gemma2": _layout("model.layers", "mlp.down_proj", "post_feedforward_layernorm"),
    "gemma3_text": _layout("model.layers", "mlp.down_proj", "post_feedforward_layernorm"),
    "gemma3": _layout("model.language_model.layers", "mlp.down_proj", "post_feedforward_layernorm"),
    "phi3": _layout("model.layers", "mlp.down_proj"),
    "olmo2": _layout("model.layers", "mlp.down_proj", "post_feedforward_layernorm"),
}


def get_layout(
    model: PreTrainedModel, edit_module_template: str | None = None, layer_module_template: str | None = None
) -> ModelLayout:
    """Resolve the module layout of `model` by `config.model_type`, or from explicit templates.

    Args:
        model ([`~transformers.PreTrainedModel`]): the model to edit.
        edit_module_template (`str`, *optional*):
            Name of the edited MLP down-projection of block `i`, e.g. `"model.layers.{}.mlp.down_proj"`; overrides
            the table (for architectures missing from it). Needs `layer_module_template`.
        layer_module_template (`str`, *optional*): Name of decoder block `i`, e.g. `"model.layers.{}"`.

    Returns:
        [`ModelLayout`]: the layout, checked against the model's modules.

    Raises:
        ValueError: if the model type has no layout and no templates are given, or a named module does not exist.
    """
    if edit_module_template is not None:
        if layer_module_template is None:
            raise ValueError("`edit_module_template` needs `layer_module_template` as well (e.g. `model.layers.{}`).")
        layout = ModelLayout(layer_module_template, edit_module_template, layer_module_template.rsplit(".", 1)[0])
    else:
        model_type = model.config.model_type
        if model_type not in MODEL_TYPE_TO_LAYOUT:
            raise ValueError(
                f"Model type `{model_type}` has no layout in memit-hf; pass `edit_module_template=...` "
                "(e.g. `model.layers.{}.mlp.down_proj`) and `layer_module_template=...` (e.g. `model.layers.{}`) "
                f"in `EditingArguments`. Known types: {sorted(MODEL_TYPE_TO_LAYOUT)}."
            )
        layout = MODEL_TYPE_TO_LAYOUT[model_type]
    modules = dict(model.named_modules())
    for name in (layout.layer_name(0), layout.edit_name(0), layout.layers_attr):
        if name not in modules:
            raise ValueError(f"Module `{name}` not found in `{type(model).__name__}`; check the layout templates.")
    return layout


def num_layers(model: PreTrainedModel, layout: ModelLayout) -> int:
    """The number of decoder blocks of `model`."""
    return len(model.get_submodule(layout.layers_attr))


def is_transposed(module: nn.Module) -> bool:
    """Whether the module stores its weight as `(in, out)`: GPT-2's `Conv1D` (the only such module among the
    supported architectures)."""
    return isinstance(module, Conv1D)


def output_logits(model: PreTrainedModel, hidden: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Next-token logits of final (normed) hidden states: the model's LM head and, where the model has one, its final
    logit soft-capping (Gemma 2/3). Running the head on chosen positions only is what the z
    optimisation and the teacher-forced scores need; a causal LM that does more after its head (a logit scale) is not
    covered, so callers that cannot vouch for the model compare with its own logits first.

    Args:
        model (`PreTrainedModel`): a causal language model.
        hidden (`torch.Tensor`): `(..., d_model)` outputs of its decoder (`model.base_model(...).last_hidden_state`).
        dtype (`torch.dtype`, *optional*): cast the head's output to this dtype before the soft-capping (default:
            the head's dtype).

    Returns:
        `torch.Tensor`: `(..., vocab)` logits.
    """
    logits = model.get_output_embeddings()(hidden)
    if dtype is not None:
        logits = logits.to(dtype)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def cache_keyword(module: nn.Module) -> str:
    """The keyword under which `module`'s forward takes a KV cache: `cache` (transformers 5.25 and later) or
    `past_key_values` (earlier versions, remote code, anything else)."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def output_cache(output: Any) -> Any:
    """The KV cache a forward returned (`cache`, or `past_key_values` before transformers 5.25), or None."""
    for name in ("cache", "past_key_values"):
        value = output.get(name) if isinstance(output, Mapping) else getattr(output, name, None)
        if value is not None:
            return value
    return None
