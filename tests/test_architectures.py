"""Tests of `memit_hf.architectures` (the layout table) and of `memit_hf.defaults` (default layers and hyperparameter
resolution on tiny models; the papers' per-model settings are tested in `test_defaults.py`)."""

import warnings

import pytest
import torch
from torch import nn

from memit_hf.architectures import (
    MODEL_TYPE_TO_LAYOUT,
    ModelLayout,
    cache_keyword,
    get_layout,
    is_transposed,
    num_layers,
    output_cache,
)
from memit_hf.arguments import EditingArguments
from memit_hf.defaults import default_layers, resolve_arguments
from memit_hf.editor import Editor
from memit_hf.tokenization import encode_targets, encode_texts
from tests.testing_utils import (
    TINY_HIDDEN_SIZE,
    TINY_INTERMEDIATE_SIZE,
    TINY_MODEL_TYPES,
    TINY_NUM_LAYERS,
    build_tiny_causal_lm,
    build_tiny_tokenizer,
    subject_final_requests,
    tiny_corpus,
    tiny_editing_arguments,
)


@pytest.mark.parametrize("model_type", sorted(MODEL_TYPE_TO_LAYOUT))
def test_every_layout_resolves_to_the_mlp_down_projection(model_type):
    model = build_tiny_causal_lm(model_type, vocab_size=64)
    layout = get_layout(model)
    assert layout is MODEL_TYPE_TO_LAYOUT[model_type]
    assert num_layers(model, layout) == TINY_NUM_LAYERS
    stack = model.get_submodule(layout.layers_attr)
    assert isinstance(stack, nn.ModuleList)
    # The tiny GPT-2 and GPT-J keep the GPT default MLP width of 4 * d_model; every other tiny model has 64.
    d_ff = 4 * TINY_HIDDEN_SIZE if model_type in ("gpt2", "gptj") else TINY_INTERMEDIATE_SIZE
    for layer in range(TINY_NUM_LAYERS):
        assert model.get_submodule(layout.layer_name(layer)) is stack[layer]
        module = model.get_submodule(layout.edit_name(layer))
        assert layout.edit_name(layer).startswith(layout.layer_name(layer) + ".")
        # The key is the MLP hidden activation (d_ff) and the output lands in the residual stream (d_model).
        d_in, d_out = module.weight.shape if is_transposed(module) else module.weight.shape[::-1]
        assert (d_in, d_out) == (d_ff, TINY_HIDDEN_SIZE), (model_type, tuple(module.weight.shape))
    assert is_transposed(model.get_submodule(layout.edit_name(0))) == (model_type == "gpt2")


def test_edit_module_input_is_the_mlp_activation():
    """For Llama the key is act(gate(x)) * up(x) and the block output is the residual stream after the MLP."""
    model = build_tiny_causal_lm("llama", vocab_size=64)
    layout = get_layout(model)
    mlp = model.model.layers[1].mlp
    seen = {}
    hooks = [
        mlp.register_forward_pre_hook(lambda m, a: seen.__setitem__("mlp_in", a[0])),
        model.get_submodule(layout.edit_name(1)).register_forward_pre_hook(lambda m, a: seen.__setitem__("key", a[0])),
    ]
    with torch.no_grad():
        model(input_ids=torch.tensor([[3, 4, 5, 6]]))
    for hook in hooks:
        hook.remove()
    expected = mlp.act_fn(mlp.gate_proj(seen["mlp_in"])) * mlp.up_proj(seen["mlp_in"])
    torch.testing.assert_close(seen["key"], expected, rtol=0, atol=0)


EXTRA_TYPES = sorted(set(MODEL_TYPE_TO_LAYOUT) - set(TINY_MODEL_TYPES))


@pytest.mark.parametrize("model_type", EXTRA_TYPES)
def test_edit_runs_on_every_other_layout(model_type, tmp_path):
    """Architectures outside the tiny fixture set: a full MEMIT edit runs and raises every target's probability."""
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_causal_lm(model_type, vocab_size=len(tokenizer))
    requests = subject_final_requests()
    prompts = [r["prompt"].format(r["subject"]) for r in requests]
    first_target = [ids[0] for ids in encode_targets(tokenizer, [r["target_new"] for r in requests])]

    def target_log_probs():
        with torch.no_grad():
            return torch.stack(
                [
                    torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1], -1)[token]
                    for ids, token in zip(encode_texts(tokenizer, prompts), first_target)
                ]
            )

    before = target_log_probs()
    args = tiny_editing_arguments(tmp_path, v_num_grad_steps=8)
    output = Editor(model, args=args, processing_class=tokenizer, stats_dataset=tiny_corpus()).edit(requests)
    after = target_log_probs()
    assert len(output.deltas) == 2
    assert (after > before + 0.05).all(), (before, after)
    assert 0.1 < output.metrics["residual_achieved"] <= 1.0


@pytest.mark.parametrize(
    "n_layers, expected",
    [
        (1, [0]),
        (2, [0, 1]),
        (3, [0, 1, 2]),
        (5, [0, 1, 2, 3, 4]),
        (6, [0, 1, 2, 3, 4]),
        (12, [1, 2, 3, 4, 5]),
        (28, [2, 3, 4, 5, 6]),
        (30, [3, 4, 5, 6, 7]),
        (32, [3, 4, 5, 6, 7]),
        (48, [4, 5, 6, 7, 8]),
        (80, [8, 9, 10, 11, 12]),
    ],
)
def test_default_layers_memit(n_layers, expected):
    assert default_layers(n_layers) == expected
    assert default_layers(n_layers, "memit") == expected


@pytest.mark.parametrize("n_layers, expected", [(1, 0), (2, 0), (3, 0), (12, 2), (28, 5), (30, 6), (32, 6), (48, 9)])
def test_default_layers_rome(n_layers, expected):
    assert default_layers(n_layers, "rome") == [expected]


def test_default_layers_are_valid_for_every_depth():
    for n_layers in range(1, 129):
        layers = default_layers(n_layers)
        assert layers == list(range(layers[0], layers[0] + len(layers))), n_layers
        assert len(layers) == min(5, n_layers), n_layers
        assert 0 <= layers[0] <= n_layers // 10 and layers[-1] < n_layers, n_layers
        (rome,) = default_layers(n_layers, "rome")
        assert 0 <= rome < n_layers, n_layers


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def test_resolve_arguments_fills_per_model_defaults(tokenizer):
    gpt2 = build_tiny_causal_lm("gpt2", len(tokenizer))
    resolved = resolve_arguments(gpt2, EditingArguments(), get_layout(gpt2))
    assert resolved.layers == [0, 1, 2]
    # A tiny GPT-2 is not GPT-2 XL: the generic defaults, not the MEMIT paper's lambda 20000 and 20 z steps.
    assert resolved.algorithm_config == {"mom2_update_weight": 1000.0} and resolved.clamp_norm_factor == 0.75
    assert resolved.v_lr == 0.5 and resolved.v_weight_decay == 0.5 and resolved.v_num_grad_steps == 25
    llama = build_tiny_causal_lm("llama", len(tokenizer))
    user = EditingArguments(layers=[2], algorithm_config={"mom2_update_weight": 7.0}, v_lr=0.1)
    resolved = resolve_arguments(llama, user, get_layout(llama))
    assert resolved.layers == [2] and resolved.algorithm_config["mom2_update_weight"] == 7.0 and resolved.v_lr == 0.1
    assert resolved.clamp_norm_factor == 0.75 and resolved.v_weight_decay == 0.5
    # The user's arguments are left untouched.
    assert user.clamp_norm_factor is None and user.v_weight_decay is None
    rome = resolve_arguments(llama, EditingArguments(algorithm="rome"), get_layout(llama))
    assert rome.layers == [0]


@pytest.mark.parametrize("layers", [[3], [0, 3], [-1], [1, 2, 7]])
def test_resolve_arguments_rejects_out_of_range_layers(tokenizer, layers):
    model = build_tiny_causal_lm("llama", len(tokenizer))
    bad = next(layer for layer in layers if not 0 <= layer < 3)
    with pytest.raises(ValueError, match=rf"`layers` has {bad}, outside the model's 3 layers \(0\.\.2\)"):
        resolve_arguments(model, EditingArguments(layers=layers), get_layout(model))


def test_unknown_model_type_error_names_the_overrides(tokenizer):
    model = build_tiny_causal_lm("llama", len(tokenizer))
    model.config.model_type = "mystery"
    with pytest.raises(
        ValueError, match=r"Model type `mystery` has no layout in memit-hf; pass `edit_module_template"
    ):
        get_layout(model)
    with pytest.raises(ValueError, match=r"`layer_module_template=\.\.\.` \(e\.g\. `model\.layers\.\{\}`\)"):
        get_layout(model)
    layout = get_layout(
        model, edit_module_template="model.layers.{}.mlp.down_proj", layer_module_template="model.layers.{}"
    )
    assert layout == ModelLayout("model.layers.{}", "model.layers.{}.mlp.down_proj", "model.layers")


def test_override_errors(tokenizer):
    model = build_tiny_causal_lm("llama", len(tokenizer))
    with pytest.raises(ValueError, match=r"`edit_module_template` needs `layer_module_template` as well"):
        get_layout(model, edit_module_template="model.layers.{}.mlp.down_proj")
    with pytest.raises(ValueError, match=r"Module `model\.layers\.0\.mlp\.c_proj` not found in `LlamaForCausalLM`"):
        get_layout(model, edit_module_template="model.layers.{}.mlp.c_proj", layer_module_template="model.layers.{}")
    # Overrides win over the table, even for a known model type.
    layout = get_layout(
        model, edit_module_template="model.layers.{}.mlp.up_proj", layer_module_template="model.layers.{}"
    )
    assert layout.edit_name(1) == "model.layers.1.mlp.up_proj"


def test_layout_of_wrong_architecture_is_detected(tokenizer):
    model = build_tiny_causal_lm("gpt2", len(tokenizer))
    model.config.model_type = "llama"
    with pytest.raises(ValueError, match=r"Module `model\.layers\.0` not found in `GPT2LMHeadModel`"):
        get_layout(model)


def test_kv_cache_keyword_and_output_follow_the_installed_transformers():
    """transformers 5.25 takes and returns the KV cache as `cache` (`past_key_values` deprecated); earlier versions and
    remote code use `past_key_values`. A real forward with the keyword `cache_keyword` names returns the cache that
    `output_cache` finds, and a second forward continues it."""

    class NewStyle(torch.nn.Module):
        def forward(self, input_ids=None, cache=None, use_cache=None): ...

    class OldStyle(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, **kwargs): ...

    assert cache_keyword(NewStyle()) == "cache" and cache_keyword(OldStyle()) == "past_key_values"
    assert output_cache({"cache": 1}) == 1 and output_cache({"past_key_values": 2}) == 2
    assert output_cache(type("Output", (), {"logits": 0})()) is None
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    ids = torch.tensor([[1, 2, 3, 4]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation warning on any installed version
        first = model(input_ids=ids[:, :3], use_cache=True)
        cache = output_cache(first)
        assert cache is not None and cache.get_seq_length() == 3
        step = model(input_ids=ids[:, 3:], use_cache=True, **{cache_keyword(model): cache})
    full = model(input_ids=ids).logits
    torch.testing.assert_close(step.logits[:, -1], full[:, -1], rtol=1e-5, atol=1e-5)
