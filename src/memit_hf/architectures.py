"""Where MEMIT looks inside each architecture: one table keyed by `config.model_type`."""

from dataclasses import dataclass, fields, replace

import torch
from torch import nn
from transformers import PreTrainedModel

from .algorithms.registry import get_config_class
from .arguments import EditingArguments


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

# Hyperparameters used when the user leaves a field at None. The reference's GPT-2 XL / GPT-J / Llama-3 defaults are
# kept for the models they were tuned on (algorithm.md section 7); every other model gets the values measured on
# SmolLM2-135M (benchmarks/README.md), which suit small and mid-size Llama-style models.
# Keys are `EditingArguments` fields or method hyperparameters (filled wherever the chosen method has that field).
REFERENCE_DEFAULTS = {
    "gptj": dict(mom2_update_weight=15000.0, v_lr=0.5, v_weight_decay=0.5, clamp_norm_factor=0.75),
    "gpt2": dict(mom2_update_weight=20000.0, v_lr=0.5, v_weight_decay=0.5, clamp_norm_factor=0.75),
}
GENERIC_DEFAULTS = dict(mom2_update_weight=1000.0, v_lr=0.5, v_weight_decay=0.5, clamp_norm_factor=0.75)


def model_defaults(model_type: str) -> dict[str, float]:
    """The hyperparameters used for a model type when the user leaves them at `None`."""
    return dict(REFERENCE_DEFAULTS.get(model_type, GENERIC_DEFAULTS))


def get_layout(model: PreTrainedModel, args: EditingArguments | None = None) -> ModelLayout:
    """Resolve the module layout of `model` by `config.model_type`, honouring the override fields of `args`.

    Raises:
        ValueError: if the model type has no layout and no overrides are given, or a named module does not exist.
    """
    overrides = args is not None and args.edit_module_template is not None
    if overrides:
        if args.layer_module_template is None:
            raise ValueError("`edit_module_template` needs `layer_module_template` as well (e.g. `model.layers.{}`).")
        layout = ModelLayout(
            args.layer_module_template, args.edit_module_template, args.layer_module_template.rsplit(".", 1)[0]
        )
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
    return len(model.get_submodule(layout.layers_attr))


def default_layers(n_layers: int, algorithm: str = "memit") -> list[int]:
    """The default edited layers for a model of `n_layers` blocks, as the method asks for them.

    A method of any number of layers (MEMIT) edits five consecutive early-middle layers starting at 10 % of the depth
    (GPT-J 28 layers -> 2..6, SmolLM2 30 -> 3..7, Llama-3-8B 32 -> 3..7); shallower models get as many as fit. A
    single-layer method (ROME) edits the layer at 20 % of the depth (its `default_layers_fraction`).
    """
    config = get_config_class(algorithm)
    count = config.num_layers or 5
    start = min(int(config.default_layers_fraction * n_layers), max(0, n_layers - count))
    return list(range(start, min(start + count, n_layers)))


def resolve_arguments(model: PreTrainedModel, args: EditingArguments, layout: ModelLayout) -> EditingArguments:
    """A copy of `args` with every `None` hyperparameter replaced by the model's default.

    Raises:
        ValueError: if a layer index is out of range.
    """
    n_layers = num_layers(model, layout)
    values = model_defaults(model.config.model_type)
    argument_fields = {f.name for f in fields(args)}
    updates = {k: v for k, v in values.items() if k in argument_fields and getattr(args, k) is None}
    method = dict(args.algorithm_config)
    method.update({k: v for k, v in values.items() if k in method and method[k] is None})
    updates["algorithm_config"] = method
    layers = args.layers if args.layers is not None else default_layers(n_layers, args.algorithm)
    for layer in layers:
        if not 0 <= layer < n_layers:
            raise ValueError(f"`layers` has {layer}, outside the model's {n_layers} layers (0..{n_layers - 1}).")
    updates["layers"] = layers
    if args.v_batch_size is None:
        updates["v_batch_size"] = default_chunk_size(model.device)
    return replace(args, **updates)


def default_chunk_size(device: torch.device) -> int:
    """Requests per z-optimisation chunk when `v_batch_size` is not set: 16 on a CPU (where larger chunks run slower
    per request), 128 on an accelerator (where larger chunks keep it busy; a chunk that does not fit is split)."""
    return 16 if device.type == "cpu" else 128


def is_transposed(module: nn.Module) -> bool:
    """Whether the module stores its weight as (in, out), like GPT-2's `Conv1D`."""
    return type(module).__name__ == "Conv1D"
