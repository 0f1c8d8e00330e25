"""Per-model hyperparameters: the papers' settings for the models they were tuned on, generic defaults for every other
model, and the resolution of the `EditingArguments` fields left at `None`."""

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from types import MappingProxyType
from typing import Any

from transformers import PretrainedConfig, PreTrainedModel

from .algorithms.alphaedit.config import PUBLISHED_L2
from .algorithms.registry import get_config_class
from .architectures import ModelLayout, num_layers
from .arguments import EditingArguments
from .settings import ValueOptimisation


GENERIC_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    dict(
        mom2_update_weight=1000.0,
        v_num_grad_steps=ValueOptimisation.num_steps,
        v_lr=ValueOptimisation.lr,
        v_weight_decay=ValueOptimisation.weight_decay,
        clamp_norm_factor=ValueOptimisation.clamp_norm_factor,
        alphaedit_l2=PUBLISHED_L2,
    )
)
"""What a model without an entry in [`MODEL_DEFAULTS`] gets: the values measured on SmolLM2-135M
(`benchmarks/README.md`), which suit small and mid-size Llama-style models (the z settings are those of
[`~memit_hf.settings.ValueOptimisation`], their one home). Keys are `EditingArguments` fields or
method hyperparameters (filled wherever the chosen method has that field); the layers come from [`default_layers`]."""


@dataclass(frozen=True)
class ModelDefaults:
    """The whole setting a paper tuned for one model and the methods it was tuned with.

    Args:
        name (`str`): the model, e.g. `"GPT-2 XL"`.
        model_type (`str`): its `config.model_type`.
        config (`Mapping[str, int]`):
            Config attributes and their values that tell the model apart from others of its type (depth, width,
            vocabulary), e.g. `{"n_layer": 48, "n_embd": 1600}`; a model matches when every one is equal.
        algorithms (`tuple[str, ...]`): the registered methods the values were tuned for.
        values (`Mapping[str, Any]`):
            `EditingArguments` fields (`layers` included) and method hyperparameters; each fills a field left at
            `None` (a method hyperparameter only when the chosen method has it).
        source (`str`): where the values are published.
    """

    name: str
    model_type: str
    config: Mapping[str, int]
    algorithms: tuple[str, ...]
    values: Mapping[str, Any]
    source: str

    def __post_init__(self):
        object.__setattr__(self, "config", MappingProxyType(dict(self.config)))
        object.__setattr__(self, "values", MappingProxyType(dict(self.values)))

    def matches(self, config: PretrainedConfig, algorithm: str) -> bool:
        """Whether this entry applies to a model of `config` edited with `algorithm`."""
        return (
            algorithm in self.algorithms
            and getattr(config, "model_type", None) == self.model_type
            and all(getattr(config, key, None) == value for key, value in self.config.items())
        )


MEMIT_PAPER_METHODS = ("memit", "memit_seq")
"""The methods that solve MEMIT's system (`memit_seq` adds earlier edits' keys to it), and so take its tuned settings."""

MODEL_DEFAULTS: tuple[ModelDefaults, ...] = (
    ModelDefaults(
        name="GPT-J-6B",
        model_type="gptj",
        config={"n_layer": 28, "n_embd": 4096},
        algorithms=MEMIT_PAPER_METHODS,
        values=dict(
            layers=(3, 4, 5, 6, 7, 8),
            mom2_update_weight=15000.0,
            v_num_grad_steps=25,
            v_lr=0.5,
            v_weight_decay=0.5,
            clamp_norm_factor=0.75,
        ),
        source="kmeng01/memit hparams/MEMIT/EleutherAI_gpt-j-6B.json",
    ),
    ModelDefaults(
        name="GPT-2 XL",
        model_type="gpt2",
        config={"n_layer": 48, "n_embd": 1600},
        algorithms=MEMIT_PAPER_METHODS,
        values=dict(
            layers=(13, 14, 15, 16, 17),
            mom2_update_weight=20000.0,
            v_num_grad_steps=20,
            v_lr=0.5,
            v_weight_decay=0.5,
            clamp_norm_factor=0.75,
        ),
        source="kmeng01/memit hparams/MEMIT/gpt2-xl.json",
    ),
    ModelDefaults(
        name="Llama-3-8B",
        model_type="llama",
        config={"num_hidden_layers": 32, "hidden_size": 4096, "vocab_size": 128256},
        algorithms=MEMIT_PAPER_METHODS,
        values=dict(
            layers=(4, 5, 6, 7, 8),
            mom2_update_weight=15000.0,
            v_num_grad_steps=25,
            v_lr=0.1,
            v_weight_decay=0.5,
            clamp_norm_factor=0.75,
        ),
        source="jianghoucheng/AlphaEdit hparams/MEMIT/Llama3-8B.json",
    ),
    ModelDefaults(
        name="Llama-3-8B",
        model_type="llama",
        config={"num_hidden_layers": 32, "hidden_size": 4096, "vocab_size": 128256},
        algorithms=("alphaedit",),
        values=dict(
            layers=(4, 5, 6, 7, 8),
            v_num_grad_steps=25,
            v_lr=0.1,
            v_weight_decay=0.5,
            clamp_norm_factor=0.75,
            alphaedit_l2=10.0,
        ),
        source="jianghoucheng/AlphaEdit hparams/AlphaEdit/Llama3-8B.json",
    ),
)
"""The papers' settings, one entry per (model, family of methods). An entry is chosen for a model when its
`model_type` and every `config` value match the model's config and the chosen method is one of its `algorithms`; the
first such entry wins. So GPT-2 XL (gpt2, 48 layers, width 1600), GPT-J-6B (gptj, 28 layers, width 4096) and
Llama-3-8B / -Instruct (llama, 32 layers, width 4096, vocabulary 128256) edited with MEMIT get the MEMIT paper's
settings (for Llama-3, those the AlphaEdit repository publishes for MEMIT), and AlphaEdit on Llama-3-8B gets the
AlphaEdit paper's; every other model (SmolLM2 is `llama` too), and every other method, gets [`GENERIC_DEFAULTS`] and
[`default_layers`]. Fields whose library default already is the paper's (`kl_factor`, the context templates, the
loss-only early stop, AlphaEdit's absolute `nullspace_threshold` 2e-2) are not repeated. AlphaEdit's ridge `L2`
(`alphaedit_l2`, absolute) is 10 in every published AlphaEdit setting and the generic default; an entry may
override it (EasyEdit's Qwen2.5-7B setting uses 1)."""


def find_model_defaults(config: PretrainedConfig, algorithm: str = "memit") -> ModelDefaults | None:
    """The entry of [`MODEL_DEFAULTS`] for a model of `config` edited with `algorithm`, or `None`."""
    return next((entry for entry in MODEL_DEFAULTS if entry.matches(config, algorithm)), None)


def model_defaults(config: PretrainedConfig, algorithm: str = "memit") -> dict[str, Any]:
    """The hyperparameters a model of `config` gets for `algorithm` when the user leaves them at `None`: the matching
    entry of [`MODEL_DEFAULTS`] (its `layers` included) over [`GENERIC_DEFAULTS`]."""
    entry = find_model_defaults(config, algorithm)
    return dict(GENERIC_DEFAULTS) | (dict(entry.values) if entry is not None else {})


def default_layers(n_layers: int, algorithm: str = "memit") -> list[int]:
    """The default edited layers for a model of `n_layers` blocks without an entry in [`MODEL_DEFAULTS`], as the
    method asks for them.

    A method of any number of layers (MEMIT) edits five consecutive early-middle layers starting at 10 % of the depth
    (SmolLM2 30 layers -> 3..7); shallower models get as many as fit. A single-layer method (ROME) edits the layer at
    20 % of the depth (its `default_layers_fraction`).
    """
    config = get_config_class(algorithm)
    count = config.num_layers or 5
    start = min(int(config.default_layers_fraction * n_layers), max(0, n_layers - count))
    return list(range(start, min(start + count, n_layers)))


def resolve_arguments(model: PreTrainedModel, args: EditingArguments, layout: ModelLayout) -> EditingArguments:
    """A copy of `args` with every `None` hyperparameter replaced by the model's default (see [`model_defaults`]):
    `EditingArguments` fields, the method's hyperparameters in `algorithm_config`, and `layers`.

    Args:
        model ([`~transformers.PreTrainedModel`]): the edited model (its config chooses the defaults).
        args ([`EditingArguments`]): the user's arguments.
        layout ([`~memit_hf.architectures.ModelLayout`]): the model's layout (for its number of layers).

    Returns:
        [`EditingArguments`]: the resolved copy.

    Raises:
        ValueError: if a layer index is out of range.
    """
    n_layers = num_layers(model, layout)
    values = model_defaults(model.config, args.algorithm)
    argument_fields = {f.name for f in fields(args)} - {"layers"}
    updates = {k: v for k, v in values.items() if k in argument_fields and getattr(args, k) is None}
    method = dict(args.algorithm_config)
    method.update({k: v for k, v in values.items() if k in method and method[k] is None})
    updates["algorithm_config"] = method
    if args.layers is not None:
        layers = args.layers
    else:
        layers = list(values["layers"]) if "layers" in values else default_layers(n_layers, args.algorithm)
    for layer in layers:
        if not 0 <= layer < n_layers:
            raise ValueError(f"`layers` has {layer}, outside the model's {n_layers} layers (0..{n_layers - 1}).")
    updates["layers"] = layers
    return replace(args, **updates)
