"""Tests of `memit_hf.settings`: one default per setting (shared with `EditingArguments` and the keyword functions),
the settings built from the arguments, validation naming the field, and a torch-free import."""

import inspect
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from memit_hf.arguments import EditingArguments
from memit_hf.settings import StatisticsSettings, ValueOptimisation


SRC = Path(__file__).resolve().parents[1] / "src"

VALUE_ARGUMENTS = {  # ValueOptimisation field -> EditingArguments field with the same default
    "kl_factor": "kl_factor",
    "early_stop_loss": "v_early_stop_loss",
    "early_stop_margin": "v_early_stop_margin",
    "early_stop_patience": "v_early_stop_patience",
    "autocast_dtype": "v_autocast_dtype",
    "norm_anchor": "v_norm_anchor",
    "norm_anchor_skip": "v_norm_anchor_skip",
}
STATISTICS_ARGUMENTS = {  # StatisticsSettings field -> EditingArguments field
    "num_tokens": "stats_num_tokens",
    "max_length": "stats_max_length",
    "batch_tokens": "stats_batch_tokens",
    "cache_dir": "stats_cache_dir",
    "sample_texts": "stats_sample_texts",
    "sample_length": "stats_sample_length",
    "seed": "seed",
    "repo": "stats_repo",
    "repo_revision": "stats_repo_revision",
    "checkpoint_every": "stats_checkpoint_every",
    "checkpoint_seconds": "stats_checkpoint_seconds",
    "hub_token": "hub_token",
}


def test_value_optimisation_defaults_are_the_arguments_defaults():
    args, defaults = EditingArguments(), ValueOptimisation()
    for name, argument in VALUE_ARGUMENTS.items():
        assert getattr(args, argument) == getattr(defaults, name), name
    # The per-model fields left at None (and `v_num_grad_steps` either way) take the ValueOptimisation defaults.
    assert args.value_optimisation() == defaults
    assert defaults.early_stop_patience == 5 and defaults.chunk_size is None and defaults.use_prefix_cache


def test_compute_target_values_defaults_are_the_value_optimisation_defaults():
    from memit_hf.values import compute_target_values

    parameters = inspect.signature(compute_target_values).parameters
    for field in fields(ValueOptimisation):
        name = {"chunk_size": "batch_size"}.get(field.name, field.name)
        assert parameters[name].default == field.default, name


def test_value_optimisation_reads_every_z_argument():
    args = EditingArguments(
        v_num_grad_steps=9,
        v_lr=0.1,
        v_weight_decay=0.2,
        clamp_norm_factor=3.0,
        kl_factor=0.5,
        v_early_stop_loss=0.01,
        v_early_stop_margin=1.5,
        v_early_stop_patience=2,
        v_batch_size=7,
        v_autocast_dtype="bfloat16",
        v_norm_anchor=3.5,
        v_norm_anchor_skip=None,
    )
    assert args.value_optimisation() == ValueOptimisation(
        num_steps=9,
        lr=0.1,
        weight_decay=0.2,
        clamp_norm_factor=3.0,
        kl_factor=0.5,
        early_stop_loss=0.01,
        early_stop_margin=1.5,
        early_stop_patience=2,
        chunk_size=7,
        autocast_dtype="bfloat16",
        norm_anchor=3.5,
        norm_anchor_skip=None,
    )
    unresolved = EditingArguments()
    unresolved.v_num_grad_steps = None  # per-model defaults still missing: the generic defaults
    assert unresolved.value_optimisation().num_steps == ValueOptimisation.num_steps


def test_statistics_settings_read_every_statistics_argument():
    args = EditingArguments(
        stats_num_tokens=800,
        stats_max_length=64,
        stats_batch_tokens=256,
        stats_cache_dir="/tmp/stats",
        stats_sample_texts=3,
        stats_sample_length=16,
        seed=7,
        stats_repo="user/stats",
        stats_repo_revision="v1",
        stats_checkpoint_every=2,
        stats_checkpoint_seconds=None,
        hub_token="hf_secret",
    )
    settings = args.statistics_settings()
    assert {f.name for f in fields(StatisticsSettings)} == set(STATISTICS_ARGUMENTS)
    for name, argument in STATISTICS_ARGUMENTS.items():
        assert getattr(settings, name) == getattr(args, argument), name
    assert "hf_secret" not in repr(settings)
    # The defaults are shared too.
    assert EditingArguments().statistics_settings() == StatisticsSettings()


def test_statistics_settings_are_hashable_and_compare_by_value():
    first = EditingArguments(stats_num_tokens=800).statistics_settings()
    same = EditingArguments(stats_num_tokens=800).statistics_settings()
    other = EditingArguments(stats_num_tokens=801).statistics_settings()
    assert first == same and hash(first) == hash(same) and first != other
    assert len({first, same, other}) == 2
    with pytest.raises(AttributeError):
        first.num_tokens = 5  # frozen


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_steps", 0),
        ("num_steps", 2.5),
        ("lr", -0.1),
        ("weight_decay", -1.0),
        ("clamp_norm_factor", float("nan")),
        ("kl_factor", None),
        ("early_stop_loss", None),
        ("early_stop_margin", "1.0"),
        ("early_stop_patience", -1),
        ("chunk_size", 0),
        ("chunk_size", 1.5),
        ("autocast_dtype", "float32"),
    ],
)
def test_bad_value_optimisation_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"`{field}`"):
        ValueOptimisation(**{field: value})


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_tokens", 0),
        ("max_length", -1),
        ("batch_tokens", None),
        ("sample_texts", 0),
        ("sample_length", 0),
        ("checkpoint_every", 0),
        ("checkpoint_seconds", 0.0),
    ],
)
def test_bad_statistics_settings_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"`{field}`"):
        StatisticsSettings(**{field: value})


def test_statistics_settings_batch_must_hold_a_piece():
    with pytest.raises(ValueError, match="`batch_tokens`.*`max_length`"):
        StatisticsSettings(max_length=512, batch_tokens=256)


def test_settings_module_is_torch_free():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    code = "import sys, memit_hf.settings; assert 'torch' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    source = (SRC / "memit_hf" / "settings.py").read_text(encoding="utf-8")
    assert "from ." not in source and "import memit_hf" not in source  # a leaf: imports nothing of memit_hf
