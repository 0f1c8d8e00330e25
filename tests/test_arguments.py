"""Tests of `memit_hf.arguments.EditingArguments`: validation, YAML recipes and command-line parsing."""

from dataclasses import fields

import pytest
import yaml
from transformers import HfArgumentParser

from memit_hf.algorithms import ALGORITHM_NAMES, MEMITConfig, ROMEConfig
from memit_hf.arguments import EditingArguments


def test_defaults_leave_per_model_fields_unset():
    args = EditingArguments()
    assert args.algorithm == "memit"
    assert not hasattr(args, "fact_token")  # removed: the subject's last token is always edited
    for name in ("layers", "v_num_grad_steps", "v_lr", "v_weight_decay", "clamp_norm_factor", "stats_cache_dir"):
        assert getattr(args, name) is None, name
    assert args.algorithm_config == {"mom2_update_weight": None}
    assert args.method_config == MEMITConfig()
    assert args.kl_factor == 0.0625
    assert args.v_early_stop_loss == 0.05
    assert args.num_context_templates == 5 and args.context_template_length == 10
    assert ALGORITHM_NAMES == ("memit", "rome", "memit_seq", "emmet", "alphaedit")


def test_layers_are_normalised_to_ints():
    args = EditingArguments(layers=["3", 4.0, 5])
    assert args.layers == [3, 4, 5]
    assert all(type(layer) is int for layer in args.layers)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"algorithm": "grace"},
            r"`algorithm` must be one of \['memit', 'rome', 'memit_seq', 'emmet', 'alphaedit'\], got `grace`",
        ),
        ({"layers": []}, r"`layers` must name at least one layer"),
        ({"layers": [4, 3]}, r"`layers` must be strictly ascending without repeats, got \[4, 3\]"),
        ({"layers": [3, 3, 4]}, r"strictly ascending without repeats, got \[3, 3, 4\]"),
        (
            {"algorithm": "rome", "layers": [3, 4]},
            r"`algorithm='rome'` edits exactly 1 layer\(s\), got `layers=\[3, 4\]`",
        ),
        ({"v_num_grad_steps": 0}, r"`v_num_grad_steps` must be a positive integer, got 0"),
        ({"v_batch_size": -1}, r"`v_batch_size` must be a positive integer, got -1"),
        ({"stats_num_tokens": 0}, r"`stats_num_tokens` must be a positive integer, got 0"),
        ({"stats_sample_texts": 0}, r"`stats_sample_texts` must be a positive integer"),
        ({"context_template_length": 0}, r"`context_template_length` must be a positive integer"),
        ({"num_context_templates": -1}, r"`num_context_templates` must be >= 0, got -1"),
        ({"algorithm_config": {"mom2_update_weight": -1.0}}, r"`mom2_update_weight` must be positive, got -1.0"),
        ({"algorithm_config": {"mom2_update_weight": 0.0}}, r"`mom2_update_weight` must be positive, got 0.0"),
        ({"algorithm_config": {"alphaedit_l2": 1.0}}, r"\['alphaedit_l2'\], which are not hyperparameters of `memit`"),
        ({"algorithm": "rome", "algorithm_config": MEMITConfig()}, r"is a `MEMITConfig` but `algorithm` is `rome`"),
        ({"v_lr": -0.5}, r"`v_lr` must be non-negative, got -0.5"),
        ({"clamp_norm_factor": -2.0}, r"`clamp_norm_factor` must be non-negative"),
        ({"v_weight_decay": -1e-3}, r"`v_weight_decay` must be non-negative"),
        (
            {"stats_max_length": 1024, "stats_batch_tokens": 512},
            r"`stats_batch_tokens` \(512\) must be at least `stats_max_length` \(1024\)",
        ),
    ],
)
def test_invalid_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EditingArguments(**kwargs)


def test_valid_edge_values_are_accepted():
    args = EditingArguments(
        algorithm="rome",
        layers=[0],
        num_context_templates=0,
        algorithm_config=ROMEConfig(),
        stats_max_length=64,
        stats_batch_tokens=64,
    )
    assert args.layers == [0] and args.num_context_templates == 0


def test_yaml_round_trip(tmp_path):
    args = EditingArguments(
        layers=[2, 3],
        algorithm_config={"mom2_update_weight": 15000.0},
        v_lr=0.1,
        seed=7,
        stats_cache_dir=str(tmp_path / "stats"),
        model_init_kwargs={"dtype": "float32"},
    )
    path = tmp_path / "recipe.yaml"
    args.to_yaml(path)
    content = yaml.safe_load(path.read_text())
    assert list(content) == [f.name for f in fields(EditingArguments)]
    loaded = EditingArguments.from_yaml(path)
    assert loaded == args
    assert loaded.to_dict() == args.to_dict()


def test_from_yaml_overrides_and_validation(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("layers: [1, 2]\nv_lr: 0.25\n")
    args = EditingArguments.from_yaml(path, v_lr=0.5, seed=3)
    assert args.layers == [1, 2] and args.v_lr == 0.5 and args.seed == 3

    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert EditingArguments.from_yaml(empty) == EditingArguments()

    bad = tmp_path / "bad.yaml"
    bad.write_text("layers: [1]\nlearning_rate: 0.1\nzeta: 1\n")
    with pytest.raises(
        ValueError, match=r"Unknown `EditingArguments` keys in .*bad\.yaml: \['learning_rate', 'zeta'\]"
    ):
        EditingArguments.from_yaml(bad)

    invalid = tmp_path / "invalid.yaml"
    invalid.write_text("layers: [3, 2]\n")
    with pytest.raises(ValueError, match="strictly ascending"):
        EditingArguments.from_yaml(invalid)


def test_read_recipe_checks_the_keys_once(tmp_path):
    """`read_recipe` reads a recipe and refuses unknown keys naming them and the file (the message `from_yaml` and
    `memit-hf --config` give); a non-mapping is refused too, an empty file is an empty mapping."""
    path = tmp_path / "recipe.yaml"
    path.write_text("layers: [1, 2]\nmom2_update_weight: 10.0\n")
    assert EditingArguments.read_recipe(path) == {"layers": [1, 2], "mom2_update_weight": 10.0}
    path.write_text("")
    assert EditingArguments.read_recipe(path) == {}
    path.write_text("layers: [1]\nlearning_rate: 0.1\n")
    message = f"Unknown `EditingArguments` keys in {path}: ['learning_rate']."
    for read in (EditingArguments.read_recipe, EditingArguments.from_yaml):
        with pytest.raises(ValueError) as error:
            read(path)
        assert str(error.value) == message
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match=r"must hold a YAML mapping of `EditingArguments` fields, got a list"):
        EditingArguments.read_recipe(path)


def test_fact_token_of_older_recipes_and_states_still_loads(tmp_path):
    """`fact_token` is no longer a field: `fact_token: subject_last` (its only value) in a recipe or a flat mapping is
    dropped with a `FutureWarning`, any other value is an error, and a saved state's arguments ignore it."""
    path = tmp_path / "old.yaml"
    path.write_text("layers: [1, 2]\nfact_token: subject_last\n")
    with pytest.warns(FutureWarning, match=r"`fact_token` is no longer an `EditingArguments` field.*old\.yaml"):
        args = EditingArguments.from_yaml(path)
    assert args == EditingArguments(layers=[1, 2])
    with pytest.warns(FutureWarning, match="fact_token"):
        assert EditingArguments.from_flat({"fact_token": "subject_last"}) == EditingArguments()
    path.write_text("fact_token: last\n")
    with pytest.raises(ValueError, match=r"`fact_token` must be `subject_last` .*got `last` in .*old\.yaml"):
        EditingArguments.from_yaml(path)
    with pytest.raises(TypeError, match="fact_token"):
        EditingArguments(fact_token="subject_last")
    saved = {**EditingArguments(layers=[3]).editing_values(), "fact_token": "subject_last"}
    assert EditingArguments.from_saved(saved) == EditingArguments(layers=[3])


def test_hf_argument_parser_command_line():
    parser = HfArgumentParser(EditingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--layers", "3", "4", "5", "--algorithm", "memit", "--v_lr", "0.1", "--seed", "1", "--stats_num_tokens", "50"]
    )
    assert args.layers == [3, 4, 5]
    assert args.v_lr == 0.1 and args.seed == 1 and args.stats_num_tokens == 50
    assert args.algorithm_config == {"mom2_update_weight": None}
    (args,) = parser.parse_dict({"layers": [1], "algorithm": "rome", "model_init_kwargs": {"dtype": "float32"}})
    assert args.algorithm == "rome" and args.model_init_kwargs == {"dtype": "float32"}


def test_every_field_has_help():
    for f in fields(EditingArguments):
        assert f.metadata.get("help"), f.name


def test_method_hyperparameters_are_flat_keys_of_recipes(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("algorithm: memit\nmom2_update_weight: 5000.0\nlayers: [1, 2]\n")
    args = EditingArguments.from_yaml(path)
    assert args.algorithm_config == {"mom2_update_weight": 5000.0}
    assert args.method_config == MEMITConfig(mom2_update_weight=5000.0)
    path.write_text("algorithm: rome\nmom2_update_weight: 5000.0\nlayers: [1]\n")
    with pytest.raises(
        ValueError, match=r"sets \['mom2_update_weight'\], which are not hyperparameters of `algorithm='rome'`"
    ):
        EditingArguments.from_yaml(path)


def test_the_method_decides_how_many_layers_it_edits():
    from memit_hf.defaults import default_layers

    assert ROMEConfig.num_layers == 1 and MEMITConfig.num_layers is None
    assert default_layers(30, "rome") == [6]
    assert default_layers(30, "memit") == [3, 4, 5, 6, 7]
    assert default_layers(3, "memit") == [0, 1, 2]
