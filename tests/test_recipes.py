"""Every recipe in `recipes/` parses into `EditingArguments` and holds the values its README says."""

from pathlib import Path

import pytest
import yaml

from memit_hf.algorithms import MEMITConfig
from memit_hf.arguments import EditingArguments
from memit_hf.defaults import GENERIC_DEFAULTS, default_layers


RECIPES = Path(__file__).resolve().parents[1] / "recipes"
# (layers, lambda, v_lr, v_num_grad_steps) from algorithm.md section 7 and benchmarks/README.md
EXPECTED = {
    "smollm2-135m.yaml": ([3, 4, 5, 6, 7], 1000.0, 0.5, 25),
    "gpt2-xl.yaml": ([13, 14, 15, 16, 17], 20000.0, 0.5, 20),
    "gpt-j-6b.yaml": ([3, 4, 5, 6, 7, 8], 15000.0, 0.5, 25),
    "llama3-8b.yaml": ([4, 5, 6, 7, 8], 15000.0, 0.1, 25),
}
# (stats_num_tokens, stats_max_length, stats_batch_tokens): the reference's ~44M tokens of Wikipedia cut to the
# context length in sub-batches of 3 pieces (Llama 3: 8192-token batches of 2048-token pieces); SmolLM2: every token of
# the shipped wikitext-2 valid + test files
EXPECTED_STATISTICS = {
    "smollm2-135m.yaml": (408_567, 512, 4096),
    "gpt2-xl.yaml": (44_000_000, 1024, 3072),
    "gpt-j-6b.yaml": (44_000_000, 2048, 6144),
    "llama3-8b.yaml": (44_000_000, 2048, 8192),
}


def test_every_recipe_is_listed():
    assert sorted(path.name for path in RECIPES.glob("*.yaml")) == sorted(EXPECTED)
    readme = (RECIPES / "README.md").read_text()
    assert all(f"`{name}`" in readme for name in EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_parses_into_editing_arguments(name):
    args = EditingArguments.from_yaml(RECIPES / name)
    layers, lam, lr, steps = EXPECTED[name]
    assert args.algorithm == "memit"
    assert args.layers == layers
    assert args.algorithm_config["mom2_update_weight"] == lam and args.v_lr == lr and args.v_num_grad_steps == steps
    # shared by every MEMIT reference configuration
    assert (args.v_weight_decay, args.clamp_norm_factor, args.kl_factor) == (0.5, 0.75, 0.0625)
    assert args.stats_batch_tokens >= args.stats_max_length
    # every value is written out (no field left to a per-model default) and floats stay floats
    values = yaml.safe_load((RECIPES / name).read_text())
    assert set(GENERIC_DEFAULTS) - {"alphaedit_l2"} | {"layers"} <= set(values)  # AlphaEdit's ridge: not MEMIT's
    assert all(isinstance(values[key], float) for key in ("mom2_update_weight", "v_lr", "clamp_norm_factor"))
    # the whole recipe: every field as its comments say, the others at their defaults
    num_tokens, max_length, batch_tokens = EXPECTED_STATISTICS[name]
    expected = EditingArguments(
        algorithm="memit",
        algorithm_config=MEMITConfig(mom2_update_weight=lam),
        layers=layers,
        v_num_grad_steps=steps,
        v_lr=lr,
        v_weight_decay=0.5,
        clamp_norm_factor=0.75,
        kl_factor=0.0625,
        v_early_stop_loss=0.05,
        v_early_stop_margin=None,
        num_context_templates=5,
        context_template_length=10,
        # the papers' models: no chat context templates, as in the references; SmolLM2: the library default
        context_template_chat=None if name == "smollm2-135m.yaml" else False,
        stats_num_tokens=num_tokens,
        stats_max_length=max_length,
        stats_batch_tokens=batch_tokens,
        seed=42,
    )
    assert args.to_dict() == expected.to_dict()


def test_smollm2_recipe_is_the_library_default():
    args = EditingArguments.from_yaml(RECIPES / "smollm2-135m.yaml")
    assert args.layers == default_layers(30)
    flat = {**args.to_dict(), **args.algorithm_config}
    memit_defaults = {key: value for key, value in GENERIC_DEFAULTS.items() if key != "alphaedit_l2"}
    assert {key: flat[key] for key in memit_defaults} == memit_defaults
    defaults = EditingArguments()
    for key in ("kl_factor", "num_context_templates", "context_template_length", "seed"):
        assert getattr(args, key) == getattr(defaults, key), key


@pytest.mark.parametrize(
    "name, distributed_type, num_processes",
    [
        ("single_process.yaml", "NO", 1),
        ("multi_gpu.yaml", "MULTI_GPU", 8),
    ],
)
def test_accelerate_configs_load(name, distributed_type, num_processes):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(RECIPES / "accelerate_configs" / name))
    assert config.distributed_type == distributed_type and config.num_processes == num_processes
    assert config.mixed_precision == "no" and not config.use_cpu
