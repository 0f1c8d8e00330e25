"""Tests of `memit_hf.defaults`: the papers' settings for the models they were tuned on, matched by model type and
config shape, and the generic defaults everywhere else. The models are built on the meta device (no weights)."""

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from memit_hf.architectures import get_layout
from memit_hf.arguments import EditingArguments
from memit_hf.defaults import GENERIC_DEFAULTS, MODEL_DEFAULTS, default_layers, find_model_defaults, resolve_arguments


RECIPES = Path(__file__).resolve().parents[1] / "recipes"

CONFIGS = {
    "gpt-j-6b": ("gptj", dict(n_layer=28, n_embd=4096, n_head=16, rotary_dim=64, vocab_size=50400, n_positions=2048)),
    "gpt2-xl": ("gpt2", dict(n_layer=48, n_embd=1600, n_head=25, vocab_size=50257, n_positions=1024)),
    "llama3-8b": (
        "llama",
        dict(
            num_hidden_layers=32,
            hidden_size=4096,
            intermediate_size=14336,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
        ),
    ),
    "smollm2-135m": (
        "llama",
        dict(
            num_hidden_layers=30,
            hidden_size=576,
            intermediate_size=1536,
            num_attention_heads=9,
            num_key_value_heads=3,
            vocab_size=49152,
        ),
    ),
}
"""The shapes of the real checkpoints' configs (GPT-J-6B, GPT-2 XL, Meta-Llama-3-8B, SmolLM2-135M)."""


def meta_model(name: str):
    model_type, values = CONFIGS[name]
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **values))


def resolved(name: str, algorithm: str = "memit") -> EditingArguments:
    model = meta_model(name)
    return resolve_arguments(model, EditingArguments(algorithm=algorithm), get_layout(model))


def settings(args: EditingArguments) -> dict:
    lam = args.algorithm_config.get("mom2_update_weight")
    return dict(
        layers=args.layers,
        mom2_update_weight=lam,
        v_num_grad_steps=args.v_num_grad_steps,
        v_lr=args.v_lr,
        v_weight_decay=args.v_weight_decay,
        clamp_norm_factor=args.clamp_norm_factor,
        kl_factor=args.kl_factor,
    )


PAPERS = {
    # kmeng01/memit hparams/MEMIT/EleutherAI_gpt-j-6B.json
    "gpt-j-6b": dict(layers=[3, 4, 5, 6, 7, 8], mom2_update_weight=15000.0, v_num_grad_steps=25, v_lr=0.5),
    # kmeng01/memit hparams/MEMIT/gpt2-xl.json
    "gpt2-xl": dict(layers=[13, 14, 15, 16, 17], mom2_update_weight=20000.0, v_num_grad_steps=20, v_lr=0.5),
    # jianghoucheng/AlphaEdit hparams/MEMIT/Llama3-8B.json (and hparams/AlphaEdit/Llama3-8B.json)
    "llama3-8b": dict(layers=[4, 5, 6, 7, 8], mom2_update_weight=15000.0, v_num_grad_steps=25, v_lr=0.1),
}
SHARED = dict(v_weight_decay=0.5, clamp_norm_factor=0.75, kl_factor=0.0625)


@pytest.mark.parametrize("name", sorted(PAPERS))
@pytest.mark.parametrize("algorithm", ["memit", "memit_seq"])
def test_memit_without_a_recipe_reproduces_the_paper(name, algorithm):
    assert settings(resolved(name, algorithm)) == PAPERS[name] | SHARED


@pytest.mark.parametrize("name", sorted(PAPERS))
def test_the_recipes_agree_with_the_defaults(name):
    """`recipes/<model>.yaml` writes out what `Editor(model)` uses without it."""
    assert settings(EditingArguments.from_yaml(RECIPES / f"{name}.yaml")) == settings(resolved(name))


def test_alphaedit_on_llama3_takes_the_alphaedit_settings():
    """hparams/AlphaEdit/Llama3-8B.json: layers 4..8, v_lr 0.1, the absolute null-space threshold 2e-2 (the config's
    default) and ridge `L2` 10."""
    args = resolved("llama3-8b", "alphaedit")
    assert args.layers == [4, 5, 6, 7, 8] and args.v_lr == 0.1 and args.v_num_grad_steps == 25
    assert (args.v_weight_decay, args.clamp_norm_factor) == (0.5, 0.75)
    assert args.algorithm_config == EditingArguments(algorithm="alphaedit").algorithm_config | {"alphaedit_l2": 10.0}
    assert args.method_config.nullspace_threshold == 2e-2 and args.method_config.effective_nullspace_rule == "absolute"
    assert find_model_defaults(meta_model("llama3-8b").config, "alphaedit").source.endswith("AlphaEdit/Llama3-8B.json")


@pytest.mark.parametrize("name", ["gpt-j-6b", "gpt2-xl"])
@pytest.mark.parametrize("algorithm", ["rome", "emmet", "alphaedit"])
def test_an_entry_applies_only_to_its_methods(name, algorithm):
    """The MEMIT paper tuned GPT-J and GPT-2 XL for MEMIT only: other methods get the generic values."""
    args = resolved(name, algorithm)
    n_layers = CONFIGS[name][1]["n_layer"]
    assert args.layers == default_layers(n_layers, algorithm)
    assert (args.v_lr, args.v_num_grad_steps, args.v_weight_decay, args.clamp_norm_factor) == (0.5, 25, 0.5, 0.75)
    if algorithm == "emmet":
        assert args.algorithm_config["mom2_update_weight"] == GENERIC_DEFAULTS["mom2_update_weight"]


@pytest.mark.parametrize("algorithm", ["memit", "memit_seq", "alphaedit", "emmet"])
def test_smollm2_keeps_the_generic_defaults(algorithm):
    """SmolLM2 is `llama` like Llama-3-8B, but of another shape: layers 3..7 of 30, lambda 1000, v_lr 0.5."""
    args = resolved("smollm2-135m", algorithm)
    assert args.layers == [3, 4, 5, 6, 7]
    assert (args.v_lr, args.v_num_grad_steps, args.v_weight_decay, args.clamp_norm_factor) == (0.5, 25, 0.5, 0.75)
    if "mom2_update_weight" in args.algorithm_config:
        assert args.algorithm_config["mom2_update_weight"] == 1000.0
    assert find_model_defaults(meta_model("smollm2-135m").config, algorithm) is None


def test_the_user_wins_over_the_paper():
    model = meta_model("gpt2-xl")
    user = EditingArguments(layers=[17], algorithm_config={"mom2_update_weight": 7.0}, v_num_grad_steps=3, v_lr=0.2)
    args = resolve_arguments(model, user, get_layout(model))
    assert settings(args) == dict(
        layers=[17],
        mom2_update_weight=7.0,
        v_num_grad_steps=3,
        v_lr=0.2,
        v_weight_decay=0.5,
        clamp_norm_factor=0.75,
        kl_factor=0.0625,
    )
    assert user.v_weight_decay is None  # the user's arguments are left untouched


def test_every_entry_names_registered_methods_and_arguments():
    from dataclasses import fields

    from memit_hf.algorithms import ALGORITHM_NAMES, get_config_class

    argument_fields = {f.name for f in fields(EditingArguments)}
    for entry in MODEL_DEFAULTS:
        assert set(entry.algorithms) <= set(ALGORITHM_NAMES), entry.name
        for algorithm in entry.algorithms:
            known = argument_fields | set(get_config_class(algorithm).field_names())
            assert set(entry.values) <= known, (entry.name, algorithm)
