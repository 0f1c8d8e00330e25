"""The `memit-hf` command: argument parsing (flags, YAML recipes) and an end-to-end `edit` on a tiny saved model."""

import argparse
import copy
import json
import math
from dataclasses import fields
from hashlib import sha256
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from memit_hf import cli
from memit_hf.arguments import EditingArguments
from memit_hf.evaluation import WILD_METRIC_KEYS
from memit_hf.tokenization import encode_targets
from tests.testing_utils import (
    build_tiny_causal_lm,
    build_tiny_chat_tokenizer,
    build_tiny_tokenizer,
    fake_dataset_hub,
    next_token_argmax,
    subject_final_requests,
    tiny_corpus,
    tiny_edit_flags,
    tiny_requests,
)


FIELD_NAMES = [f.name for f in fields(EditingArguments)]


def _subparser(command: str) -> argparse.ArgumentParser:
    return cli.subcommand_parser(cli.make_parser(), command)


@pytest.mark.parametrize("command", cli.EDITING_COMMANDS)
def test_every_editing_field_is_a_flag(command):
    options = {option for action in _subparser(command)._actions for option in action.option_strings}
    missing = [name for name in FIELD_NAMES if f"--{name}" not in options]
    assert not missing
    assert "--config" in options and "--corpus" in options


def test_flags_parse_into_editing_arguments():
    script_args, args = cli.parse_args(
        [
            "edit",
            "--requests",
            "r.jsonl",
            "--output-dir",
            "out",
            "--layers",
            "1",
            "2",
            "--v_lr",
            "0.25",
            "--mom2-update-weight",
            "300",
            "--algorithm",
            "memit",
            "--model_init_kwargs",
            '{"revision": "main"}',
            "--stats_cache_dir",
            "cache",
        ]
    )
    assert isinstance(script_args, cli.EditScriptArguments)
    assert script_args.requests == "r.jsonl" and script_args.model is None
    assert isinstance(args, EditingArguments)
    assert args.output_dir == "out"
    assert args.layers == [1, 2]
    assert args.v_lr == 0.25 and args.algorithm_config == {"mom2_update_weight": 300.0}
    assert args.model_init_kwargs == {"revision": "main"}
    assert args.stats_cache_dir == "cache"
    # untouched fields keep the dataclass defaults
    assert args.v_num_grad_steps == EditingArguments().v_num_grad_steps


def test_config_yaml_merges_and_flags_win(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"layers": [2, 3, 4], "v_lr": 0.1, "stats_num_tokens": 5000, "seed": 7}))
    _, args = cli.parse_args(["stats", "--config", str(recipe), "--v_lr", "0.9", "--seed", "1"])
    assert args.layers == [2, 3, 4]
    assert args.stats_num_tokens == 5000
    assert args.v_lr == 0.9 and args.seed == 1  # command-line flags win over the file


def test_config_yaml_overrides_demo_defaults(tmp_path):
    _, args = cli.parse_args(["demo"])
    assert args.stats_sample_texts == cli.DEMO_DEFAULTS["stats_sample_texts"]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("stats_sample_texts: 8\n")
    _, args = cli.parse_args(["demo", "--config", str(recipe)])
    assert args.stats_sample_texts == 8
    _, args = cli.parse_args(["demo", "--config", str(recipe), "--stats-sample-texts", "4"])
    assert args.stats_sample_texts == 4


def test_unknown_yaml_key_is_an_error(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("layers: [1]\nlearning_rate: 0.1\n")
    with pytest.raises(SystemExit) as error:
        cli.parse_args(["edit", "--requests", "r.json", "--config", str(recipe)])
    assert error.value.code == 2
    assert "learning_rate" in capsys.readouterr().err


def test_unknown_yaml_key_gives_the_message_of_from_yaml(tmp_path, capsys):
    """One check of a recipe's keys (`EditingArguments.read_recipe`): `--config` fails with the message of
    `EditingArguments.from_yaml`."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("layers: [1]\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError) as error:
        EditingArguments.from_yaml(recipe)
    message = str(error.value)
    assert message == f"Unknown `EditingArguments` keys in {recipe}: ['learning_rate']."
    for command in cli.EDITING_COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            cli.parse_args([command, "--requests", "r.json", "--config", str(recipe)])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.endswith(f"memit-hf {command}: error: {message}\n")
    with pytest.raises(SystemExit):
        cli.parse_script_args(cli.make_script_parser("a script"), ["--config", str(recipe)])
    assert capsys.readouterr().err.endswith(f"error: {message}\n")


def test_config_with_the_old_fact_token_still_loads(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("layers: [2, 3]\nfact_token: subject_last\n")
    with pytest.warns(FutureWarning, match="`fact_token` is no longer an `EditingArguments` field"):
        _, args = cli.parse_args(["stats", "--config", str(recipe)])
    assert args.layers == [2, 3] and not hasattr(args, "fact_token")
    with pytest.raises(SystemExit):
        cli.parse_args(["stats", "--fact_token", "subject_last"])  # no longer a flag


@pytest.mark.parametrize("name", ["edit", "stats", "evaluate", "demo", "export", "push"])
def test_every_command_is_a_module_with_make_parser_and_main(name):
    """TRL's script shape: each command module has `make_parser(subparsers=None)` (stand-alone here) and
    `main(script_args, editing_args=None)`; its stand-alone parser gives what `memit-hf NAME` gives."""
    import inspect

    from transformers import HfArgumentParser

    module = cli.command_modules()[name]
    assert list(inspect.signature(module.main).parameters) == ["script_args", "editing_args"]
    parser = module.make_parser()
    assert isinstance(parser, HfArgumentParser) and parser.prog == f"memit-hf {name}"
    argv = {
        "edit": ["--requests", "r.jsonl", "--layers", "1", "2", "--export-rank", "0.5", "--merged"],
        "stats": ["--corpus", "a.txt", "b.txt", "--push_to_hub", "me/stats"],
        "evaluate": ["--requests", "r.jsonl", "--metrics", "zsre", "--edit", "--num-requests", "3"],
        "demo": ["--seed", "3"],
        "export": ["adapter", "--output-dir", "out", "--export-rank", "2"],
        "push": ["folder", "--repo-id", "me/edits", "--private"],
    }[name]
    script_args, editing_args = cli.parse_command(parser, argv)
    assert (script_args, editing_args) == cli.parse_args([name, *argv])
    assert type(script_args).__name__ == f"{name.capitalize()}ScriptArguments"
    assert (editing_args is None) == (name not in cli.EDITING_COMMANDS)


def test_script_arguments_of_each_command():
    _, args = cli.parse_args(["demo"])
    assert args.stats_sample_texts == cli.DEMO_DEFAULTS["stats_sample_texts"]
    script_args, _ = cli.parse_args(["edit", "--requests", "r.jsonl", "--export-rank", "8", "--state-dir", "s"])
    assert script_args.export_rank == 8 and isinstance(script_args.export_rank, int) and script_args.state_dir == "s"
    assert cli.EditScriptArguments(requests="r", export_rank="0.25").export_rank == 0.25
    with pytest.raises(SystemExit):
        cli.parse_args(["edit", "--requests", "r.jsonl", "--export-rank", "many"])
    script_args, _ = cli.parse_args(["evaluate", "--requests", "r.jsonl"])
    assert script_args.metrics == ["counterfact"] and script_args.batch_size == 64 and not script_args.edit
    script_args, _ = cli.parse_args(["push", "folder", "--repo-id", "me/edits"])
    assert script_args.private is None and script_args.folder == "folder"
    script_args, _ = cli.parse_args(["push", "folder", "--repo-id", "me/edits", "--no-private"])
    assert script_args.private is False
    with pytest.raises(SystemExit):
        cli.parse_args(["push", "--repo-id", "me/edits"])  # FOLDER is required


def test_non_mapping_yaml_is_an_error(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("- 1\n- 2\n")
    with pytest.raises(SystemExit):
        cli.parse_args(["stats", "--config", str(recipe)])
    assert "mapping" in capsys.readouterr().err


def test_invalid_argument_values_are_errors(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["stats", "--algorithm", "sgd"])
    assert "algorithm" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.parse_args(["stats", "--model_init_kwargs", "[1, 2]"])
    assert "JSON object" in capsys.readouterr().err


def test_missing_command_and_missing_requests_are_errors():
    with pytest.raises(SystemExit):
        cli.parse_args([])
    with pytest.raises(SystemExit):
        cli.parse_args(["edit", "--output-dir", "out"])


def test_edit_requires_output_dir_and_existing_corpus(tmp_path):
    requests = tmp_path / "requests.json"
    requests.write_text(json.dumps(tiny_requests()))
    with pytest.raises(SystemExit, match="output-dir"):
        cli.main(["edit", "--requests", str(requests)])
    with pytest.raises(SystemExit, match="not found"):
        cli.main(["edit", "--requests", str(requests), "--output-dir", str(tmp_path / "o"), "--corpus", "nope.txt"])


@pytest.fixture
def saved_tiny_llama(tmp_path):
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    model_dir = tmp_path / "tiny-llama"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir


def subject_final_records() -> list[dict]:
    """`subject_final_requests` (each target becomes the argmax after a MEMIT edit of a tiny model) with a
    paraphrase and a neighborhood prompt each, so that `--evaluate` reports every CounterFact figure."""
    return [
        dict(
            r,
            paraphrase_prompts=["I think " + r["prompt"].format(r["subject"])],
            neighborhood_prompts=["The capital of Italy"],
        )
        for r in subject_final_requests()
    ]


def test_edit_end_to_end_on_a_saved_tiny_model(saved_tiny_llama, tmp_path, capsys):
    records = subject_final_records()
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps(r) + "\n" for r in records))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(tiny_corpus()))
    output_dir = tmp_path / "out"
    stats_dir = tmp_path / "stats"

    # The settings of `tiny_editing_arguments`, under which the tiny models' edits succeed.
    code = cli.main(
        [
            "edit",
            "--model",
            str(saved_tiny_llama),
            "--requests",
            str(requests),
            "--corpus",
            str(corpus),
            "--output-dir",
            str(output_dir),
            *tiny_edit_flags(),
            "--stats_cache_dir",
            str(stats_dir),
            "--evaluate",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "Edited 4 facts" in printed and "efficacy" in printed

    metrics = json.loads((output_dir / "edit_metrics.json").read_text())
    assert metrics["num_requests"] == 4
    assert metrics["args"]["layers"] == [0, 1]
    assert metrics["args"]["algorithm_config"] == {"mom2_update_weight": 1.0}
    for key in ("total_seconds", "statistics_seconds", "values_seconds", "residual_achieved", "efficacy_success"):
        assert key in metrics["metrics"]

    # the edit is a peft LoRA adapter, with metadata and a model card
    adapter_config = json.loads((output_dir / "adapter_config.json").read_text())
    names = [f"model.layers.{i}.mlp.down_proj" for i in (0, 1)]
    assert sorted(adapter_config["target_modules"]) == names
    assert adapter_config["base_model_name_or_path"] is None  # a temporary directory is never recorded
    metadata = json.loads((output_dir / "memit_edits.json").read_text())
    assert metadata["model_type"] == "llama" and metadata["num_edits"] == 4
    (batch,) = metadata["batches"]
    assert batch["source"] == {"requests": str(requests), "corpus": [str(corpus)]}
    assert batch["metrics"]["efficacy_success"] == metrics["metrics"]["efficacy_success"]
    assert "## Evaluation" in (output_dir / "README.md").read_text()
    tensors = load_file(output_dir / "adapter_model.safetensors")
    for name in names:
        lora_A = tensors[f"base_model.model.{name}.lora_A.weight"]
        lora_B = tensors[f"base_model.model.{name}.lora_B.weight"]
        assert lora_A.shape == (4, 64) and lora_B.shape == (32, 4)
        assert torch.isfinite(lora_B @ lora_A).all() and (lora_B @ lora_A).abs().max() > 0
    base = AutoModelForCausalLM.from_pretrained(saved_tiny_llama).eval()
    edited = PeftModel.from_pretrained(copy.deepcopy(base), output_dir)
    # The edit works: with the adapter each target's first token is the argmax after its prompt, and without it
    # none is.
    tokenizer = build_tiny_tokenizer()
    prompts = [r["prompt"].format(r["subject"]) for r in records]
    targets = [ids[0] for ids in encode_targets(tokenizer, [r["target_new"] for r in records])]
    assert next_token_argmax(edited, tokenizer, prompts) == targets
    with edited.disable_adapter():
        unedited = next_token_argmax(edited, tokenizer, prompts)
    assert unedited == next_token_argmax(base, tokenizer, prompts)
    assert all(got != target for got, target in zip(unedited, targets))

    # export --merged gives a checkpoint equal to base + adapter; --export-rank a smaller adapter
    with pytest.raises(SystemExit, match="pass --model"):
        cli.main(["export", str(output_dir), "--merged", "--output-dir", str(tmp_path / "merged")])
    cli.main(
        [
            "export",
            str(output_dir),
            "--merged",
            "--model",
            str(saved_tiny_llama),
            "--output-dir",
            str(tmp_path / "merged"),
        ]
    )
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.tensor([[5, 17, 33, 8, 90]])
    with torch.no_grad():
        assert (merged(ids).logits - edited(ids).logits).abs().max() <= 1e-5
    assert json.loads((tmp_path / "merged" / "memit_edits.json").read_text())["num_edits"] == 4
    cli.main(["export", str(output_dir), "--export-rank", "2", "--output-dir", str(tmp_path / "rank2")])
    assert json.loads((tmp_path / "rank2" / "adapter_config.json").read_text())["r"] == 2
    assert "max relative reconstruction error" in capsys.readouterr().out

    # the statistics were cached: `stats` on the same model, corpus and budget reads them back, rewriting nothing
    def cache_files():
        return {
            path.name: (path.stat().st_mtime_ns, sha256(path.read_bytes()).hexdigest())
            for path in stats_dir.rglob("*")
        }

    cached = cache_files()
    assert sum(name.endswith(".safetensors") for name in cached) == 2
    stats_argv = ["stats", "--model", str(saved_tiny_llama), "--corpus", str(corpus), "--layers", "0", "1"]
    counts = cli.stats.main(*cli.parse_args([*stats_argv, "--stats_cache_dir", str(stats_dir)]))
    names = [f"model.layers.{i}.mlp.down_proj" for i in (0, 1)]
    assert list(counts) == names
    keys = {name: info["key"] for name, info in batch["statistics"].items()}
    assert counts == {name: info["count"] for name, info in batch["statistics"].items()}
    printed = capsys.readouterr().out
    for name in names:
        assert f"  {name}: {counts[name]} tokens, dim 64 (cache, key {keys[name]})" in printed
    assert cache_files() == cached  # the same files, not rewritten


def test_evaluate_choices_match_the_library():
    from memit_hf.evaluation import EVALUATION_METRICS

    assert cli.EVALUATION_CHOICES == EVALUATION_METRICS


def test_markdown_table():
    assert cli.markdown_table({"score": 50.0, "perplexity": 12.345}) == (
        "| metric | value |\n| --- | --- |\n| score | 50.00 |\n| perplexity | 12.35 |\n"
    )
    table = cli.markdown_table({"score": 83.66, "pre_score": 40.7, "perplexity": 20.0})
    assert table.splitlines() == [
        "| metric | unedited | edited |",
        "| --- | --- | --- |",
        "| score | 40.70 | 83.66 |",
        "| perplexity |  | 20.00 |",
    ]


def test_comparison_table():
    metrics = {
        "efficacy_success": 100.0,
        "pre_efficacy_success": 0.0,
        "gen_efficacy_prefix": 75.0,
        "pre_gen_efficacy_prefix": 0.0,
        "chat_efficacy_contains": 50.0,
        "pre_chat_efficacy_contains": 25.0,
        "neighborhood_success": 80.0,
        "pre_neighborhood_success": 90.0,
        "gen_neighborhood_bleed": 12.5,
        "pre_gen_neighborhood_bleed": 0.0,
        "wild_efficacy_exact": 20.0,
        "pre_wild_efficacy_exact": 0.0,
        "wild_efficacy_contains": 40.0,
        "wild_neighborhood_unchanged": 60.0,
        "pre_wild_neighborhood_unchanged": 100.0,
    }
    assert cli.comparison_table(metrics).splitlines() == [
        "| | teacher-forced | greedy | chat | wild |",
        "| --- | --- | --- | --- | --- |",
        "| efficacy | 0.00 -> 100.00 | 0.00 -> 75.00 | 25.00 -> 50.00 | 0.00 -> 20.00 |",
        "| efficacy, answer contains |  |  |  | 40.00 |",
        "| neighborhood kept | 90.00 -> 80.00 |  |  | 100.00 -> 60.00 |",
        "| neighborhood bleed |  | 0.00 -> 12.50 |  |  |",
    ]
    assert cli.comparison_table({"gen_multihop_accuracy": 40.0, "multihop_success": 10.0}).splitlines()[2:] == [
        "| multi-hop | 10.00 | 40.00 |  |  |"
    ]
    # The wild family alone fills its column.
    assert cli.comparison_table({"wild_paraphrase_exact": 50.0, "paraphrase_success": 75.0}).splitlines()[2:] == [
        "| paraphrase | 75.00 |  |  | 50.00 |"
    ]
    assert cli.comparison_table({"efficacy_success": 100.0, "score": 90.0}) == ""


def test_evaluate_generative_and_multihop_figures(tmp_path, capsys):
    tokenizer = build_tiny_chat_tokenizer()
    model_dir = tmp_path / "tiny-llama-chat"
    build_tiny_causal_lm("llama", vocab_size=len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps(r) + "\n" for r in subject_final_records()))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(tiny_corpus()))
    edited = cli.evaluate.main(
        *cli.parse_args(
            [
                "evaluate",
                "--model",
                str(model_dir),
                "--requests",
                str(requests),
                "--edit",
                "--corpus",
                str(corpus),
                "--metrics",
                "counterfact",
                "generative",
                "--output-dir",
                str(tmp_path / "edited"),
                "--layers",
                "0",
                "1",
                "--stats_cache_dir",
                str(tmp_path / "s"),
                "--mom2_update_weight",
                "1.0",
            ]
        )
    )
    metrics = edited["metrics"]
    assert {"gen_efficacy_prefix", "chat_neighborhood_bleed", "pre_gen_efficacy_prefix"} <= set(metrics)
    assert metrics["pre_gen_neighborhood_unchanged"] == metrics["pre_chat_neighborhood_unchanged"] == 100.0
    markdown = (tmp_path / "edited" / "evaluation.md").read_text()
    efficacy_row = (
        f"| efficacy | {metrics['pre_efficacy_success']:.2f} -> {metrics['efficacy_success']:.2f} | "
        f"{metrics['pre_gen_efficacy_prefix']:.2f} -> {metrics['gen_efficacy_prefix']:.2f} | "
        f"{metrics['pre_chat_efficacy_contains']:.2f} -> {metrics['chat_efficacy_contains']:.2f} |  |"
    )
    assert "| | teacher-forced | greedy | chat | wild |" in markdown and efficacy_row in markdown
    assert "| metric | unedited | edited |" in markdown  # the full table follows
    assert efficacy_row in capsys.readouterr().out

    # MQuAKE records: one request per single-hop edit, the multi-hop questions evaluated once per case.
    mquake = Path(__file__).parent / "data" / "mquake_cf_sample.jsonl"
    plain = cli.evaluate.main(
        *cli.parse_args(
            [
                "evaluate",
                "--model",
                str(model_dir),
                "--requests",
                str(mquake),
                "--metrics",
                "multihop",
                "wild",
                "--output-dir",
                str(tmp_path / "mquake"),
            ]
        )
    )
    assert plain["num_requests"] == 4
    assert set(plain["metrics"]) == {
        "multihop_success",
        "multihop_alias_success",
        "multihop_case_success",
        "gen_multihop_accuracy",
        "gen_multihop_case_accuracy",
        "gen_multihop_old_answer",
        "chat_multihop_accuracy",
        "chat_multihop_case_accuracy",
        "chat_multihop_old_answer",
        *WILD_METRIC_KEYS,
    }
    # Each single-hop edit has its MQuAKE question and nothing else: 4 questions, no paraphrase or neighbor.
    assert plain["metrics"]["wild_questions"] == 4.0
    assert math.isnan(plain["metrics"]["wild_paraphrase_exact"])
    markdown = (tmp_path / "mquake" / "evaluation.md").read_text()
    assert "| multi-hop |" in markdown
    assert f"| efficacy |  |  |  | {plain['metrics']['wild_efficacy_exact']:.2f} |" in markdown


def test_evaluate_end_to_end_on_a_saved_tiny_model(saved_tiny_llama, tmp_path, capsys):
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps(r) + "\n" for r in tiny_requests()))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(tiny_corpus()))
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("\n\n".join(tiny_corpus()[:8]))
    common = ["--model", str(saved_tiny_llama), "--requests", str(requests), "--num-requests", "3"]

    plain = cli.evaluate.main(
        *cli.parse_args(
            ["evaluate", *common, "--output-dir", str(tmp_path / "plain"), "--metrics", "counterfact", "zsre"]
        )
    )
    assert plain["num_requests"] == 3 and not plain["edited"]
    assert {"efficacy_success", "score", "zsre_score"} <= set(plain["metrics"])
    assert not any(key.startswith("pre_") for key in plain["metrics"])
    assert "| metric | value |" in (tmp_path / "plain" / "evaluation.md").read_text()

    code = cli.main(
        [
            "evaluate",
            *common,
            "--edit",
            "--corpus",
            str(corpus),
            "--perplexity-corpus",
            str(held_out),
            "--output-dir",
            str(tmp_path / "edited"),
            "--layers",
            "0",
            "1",
            "--stats_cache_dir",
            str(tmp_path / "s"),
            "--mom2_update_weight",
            "1.0",
            "--v_num_grad_steps",
            "5",
        ]
    )
    assert code == 0
    summary = json.loads((tmp_path / "edited" / "evaluation.json").read_text())
    assert summary["edited"] and summary["args"]["layers"] == [0, 1] and summary["num_requests"] == 3
    metrics = summary["metrics"]
    assert {"score", "pre_score", "perplexity", "pre_perplexity"} <= set(metrics)
    # the unedited figures are those of the plain run on the same model
    for key, value in plain["metrics"].items():
        if not key.startswith("zsre"):
            assert metrics[f"pre_{key}"] == pytest.approx(value, nan_ok=True), key
    assert "values_seconds" in summary["edit_metrics"]
    markdown = (tmp_path / "edited" / "evaluation.md").read_text()
    assert "| metric | unedited | edited |" in markdown and "| perplexity |" in markdown
    assert "| metric | unedited | edited |" in capsys.readouterr().out

    with pytest.raises(SystemExit, match="output-dir"):
        cli.main(["evaluate", *common])
    with pytest.raises(SystemExit, match="perplexity-corpus files not found"):
        cli.main(["evaluate", *common, "--output-dir", str(tmp_path / "x"), "--perplexity-corpus", "nope.txt"])


def test_demo_runs_end_to_end_on_a_tiny_model(tmp_path, capsys):
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    demo_argv = ["demo", "--model", str(tmp_path / "model"), "--layers", "0", "1", "--stats_sample_texts", "4"]
    demo_argv += ["--stats_sample_length", "16", "--mom2_update_weight", "1.0", "--v_num_grad_steps", "5"]
    demo_argv += ["--stats_cache_dir", str(tmp_path / "stats")]
    result = cli.demo.main(*cli.parse_args(demo_argv))
    printed = capsys.readouterr().out
    headings = (
        "Before the edit:",
        "After the edit:",
        "CounterFact metrics",
        "After editor.restore():",
        "Adapter loaded back with peft:",
        "Adapter disabled:",
    )
    for heading in headings:
        assert heading in printed
    assert result["restored"][0] == result["before"][0] == result["disabled"][0]
    assert result["reloaded"] == result["after"][: len(result["reloaded"])]
    assert "original answer back: True" in printed


def test_push_uploads_a_folder_with_a_card_naming_the_repository(tmp_path, capsys, monkeypatch):
    from types import SimpleNamespace

    from huggingface_hub import HfApi

    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    (folder / "memit_edits.json").write_text(json.dumps({"base_model_name_or_path": "org/base", "batches": []}))
    (folder / "README.md").write_text("old card")
    (folder / ".env").write_text("HF_TOKEN=hf_local\n")  # never published
    calls = []
    monkeypatch.setattr(
        HfApi, "create_repo", lambda self, **kw: calls.append(("create", kw)) or SimpleNamespace(repo_id=kw["repo_id"])
    )

    def upload_folder(self, **kw):
        card = (tmp_path.joinpath(kw["folder_path"]) / "README.md").read_text()
        calls.append(
            ("upload", kw["repo_id"], sorted(p.name for p in tmp_path.joinpath(kw["folder_path"]).iterdir()), card)
        )
        return SimpleNamespace(commit_url="https://huggingface.co/me/edits/commit/1")

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    cli.main(["push", str(folder), "--repo-id", "me/edits", "--private"])
    assert calls[0] == ("create", {"repo_id": "me/edits", "private": True, "exist_ok": True, "repo_type": "model"})
    _, repo, files, card = calls[1]
    assert repo == "me/edits" and files == ["README.md", "adapter_config.json", "memit_edits.json"]
    assert 'PeftModel.from_pretrained(base, "me/edits")' in card
    assert (folder / "README.md").read_text() == "old card"  # the local folder is untouched
    assert "Pushed" in capsys.readouterr().out


def test_stats_push_to_hub_takes_the_repository(tmp_path):
    _, args = cli.parse_args(["stats", "--push_to_hub", "me/stats"])
    assert args.push_to_hub is True and args.hub_model_id == "me/stats"
    _, args = cli.parse_args(["stats", "--push_to_hub", "--hub_model_id", "me/other"])
    assert args.push_to_hub is True and args.hub_model_id == "me/other"
    _, args = cli.parse_args(["stats", "--push-to-hub", "false"])
    assert args.push_to_hub is False
    with pytest.raises(SystemExit, match=r"needs a repository: --push_to_hub REPO"):
        cli.stats.main(*cli.parse_args(["stats", "--push_to_hub"]))
    with pytest.raises(SystemExit):  # `edit` pushes an adapter to --hub_model_id: its flag stays a boolean
        cli.parse_args(["edit", "--requests", "r.jsonl", "--push_to_hub", "me/edits"])
    _, args = cli.parse_args(
        [
            "stats",
            "--stats_repo",
            "me/stats",
            "--stats_repo_revision",
            "v1",
            "--stats_checkpoint_every",
            "50",
            "--stats_checkpoint_seconds",
            "60",
        ]
    )
    assert (args.stats_repo, args.stats_repo_revision) == ("me/stats", "v1")
    assert (args.stats_checkpoint_every, args.stats_checkpoint_seconds) == (50, 60.0)


def test_stats_pushed_to_the_hub_are_used_by_edit_without_a_corpus(saved_tiny_llama, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(tiny_corpus()))
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps(r) + "\n" for r in subject_final_requests()))
    tiny = tiny_edit_flags()
    with fake_dataset_hub(tmp_path / "hub") as hub:
        cli.main(
            [
                "stats",
                "--model",
                str(saved_tiny_llama),
                "--corpus",
                str(corpus),
                "--layers",
                "0",
                "1",
                "--stats_cache_dir",
                str(tmp_path / "stats"),
                "--push_to_hub",
                "me/tiny-stats",
            ]
        )
        assert "pushed to the dataset repository me/tiny-stats" in capsys.readouterr().out
        (upload,) = hub.uploads
        assert upload["repo_type"] == "dataset" and len(upload["files"]) == 5 and "README.md" in upload["files"]
        cli.main(
            [
                "edit",
                "--model",
                str(saved_tiny_llama),
                "--requests",
                str(requests),
                *tiny,
                "--output-dir",
                str(tmp_path / "out"),
                "--stats_cache_dir",
                str(tmp_path / "fresh"),
                "--stats_repo",
                "me/tiny-stats",
            ]
        )
    edited = json.loads((tmp_path / "out" / "memit_edits.json").read_text())["batches"][0]["statistics"]
    pushed = {p.name for p in (tmp_path / "stats").glob("*.json")}
    assert {p.name for p in (tmp_path / "fresh").glob("*.json")} == pushed
    assert {f"{name}-{info['key']}.json" for name, info in edited.items()} == pushed


def test_export_rank_parses_ints_and_fractions():
    assert cli.export_rank_type("8") == 8 and isinstance(cli.export_rank_type("8"), int)
    assert cli.export_rank_type("0.9") == 0.9
    with pytest.raises(argparse.ArgumentTypeError):
        cli.export_rank_type("many")


def test_evaluate_an_adapter(saved_tiny_llama, tmp_path):
    """`evaluate --adapter` scores base + adapter and, with the adapter switched off, the unedited model: the same
    figures as editing in place (`--edit`) with the same arguments."""
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps(r) + "\n" for r in tiny_requests()[:3]))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(tiny_corpus()))
    editing = [
        "--corpus",
        str(corpus),
        "--layers",
        "0",
        "1",
        "--stats_cache_dir",
        str(tmp_path / "s"),
        "--mom2_update_weight",
        "1.0",
        "--v_num_grad_steps",
        "5",
        "--clamp_norm_factor",
        "4.0",
    ]
    common = ["--model", str(saved_tiny_llama), "--requests", str(requests)]
    cli.main(["edit", *common, *editing, "--output-dir", str(tmp_path / "adapter")])
    in_place = cli.evaluate.main(
        *cli.parse_args(["evaluate", *common, *editing, "--edit", "--output-dir", str(tmp_path / "in-place")])
    )
    with_adapter = cli.evaluate.main(
        *cli.parse_args(
            ["evaluate", *common, "--adapter", str(tmp_path / "adapter"), "--output-dir", str(tmp_path / "eval")]
        )
    )
    assert with_adapter["edited"] and with_adapter["adapter"] == str(tmp_path / "adapter")
    assert set(with_adapter["metrics"]) == set(in_place["metrics"])
    for key, value in in_place["metrics"].items():
        assert with_adapter["metrics"][key] == pytest.approx(value, abs=1e-4, nan_ok=True), key
    assert in_place["metrics"]["efficacy_magnitude"] > in_place["metrics"]["pre_efficacy_magnitude"]  # the edit works
    with pytest.raises(SystemExit, match="exclude each other"):
        cli.main(["evaluate", *common, "--edit", "--adapter", "x", "--output-dir", str(tmp_path / "y")])


def test_method_flags_parse_for_the_chosen_method():
    _, args = cli.parse_args(["stats", "--algorithm", "emmet", "--emmet_ridge", "0.5", "--accumulate_keys", "false"])
    assert args.algorithm_config == {
        "mom2_update_weight": None,
        "emmet_ridge": 0.5,
        "accumulate_keys": False,
        "emmet_ridge_relative": True,
        "update_norm_weight": 0.0,
    }
    with pytest.raises(SystemExit):
        cli.parse_args(["stats", "--algorithm", "memit", "--emmet_ridge", "0.5"])
    _, args = cli.parse_args(["stats", "--algorithm", "alphaedit", "--nullspace_rule", "relative"])
    assert args.method_config.effective_nullspace_rule == "relative"
    with pytest.raises(SystemExit):  # not one of the rules: argparse's choices
        cli.parse_args(["stats", "--algorithm", "alphaedit", "--nullspace_rule", "largest"])


def test_edit_with_a_state_dir_continues_the_saved_state(saved_tiny_llama, tmp_path, capsys):
    """Two `edit --state-dir` runs (weekly corrections) hold both batches: the top-level adapter equals editing both
    batches in one process with the library, the card lists them in order, and `batches/` has one adapter each."""
    from memit_hf.editor import Editor

    records = subject_final_records()
    weeks = []
    for i, part in enumerate([records[:2], records[2:]]):
        weeks.append(tmp_path / f"week{i}.jsonl")
        weeks[-1].write_text("".join(json.dumps(r) + "\n" for r in part))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(tiny_corpus()))
    state_dir = tmp_path / "state"
    editing = [
        "--model",
        str(saved_tiny_llama),
        "--corpus",
        str(corpus),
        *tiny_edit_flags(v_num_grad_steps=10),
        "--stats_cache_dir",
        str(tmp_path / "stats"),
        "--algorithm",
        "memit_seq",
    ]
    for week in weeks:
        assert cli.main(["edit", *editing, "--requests", str(week), "--state-dir", str(state_dir)]) == 0
    printed = capsys.readouterr().out
    assert "started the state" in printed and "continued the state" in printed and "4 edits so far" in printed
    metadata = json.loads((state_dir / "memit_edits.json").read_text())
    assert [b["num_requests"] for b in metadata["batches"]] == [2, 2] and metadata["num_edits"] == 4
    assert (state_dir / "batches" / "0001" / "adapter_config.json").is_file()
    assert json.loads((state_dir / "edit_metrics.json").read_text())["num_batches"] == 2

    _, args = cli.parse_args(["edit", *editing, "--requests", str(weeks[0]), "--output-dir", str(tmp_path / "x")])
    tokenizer = build_tiny_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(saved_tiny_llama).eval()
    editor = Editor(model, args=args, processing_class=tokenizer, stats_dataset=[str(corpus)])
    editor.edit(records[:2])
    editor.edit(records[2:])
    base = AutoModelForCausalLM.from_pretrained(saved_tiny_llama).eval()
    merged = PeftModel.from_pretrained(base, state_dir).merge_and_unload()
    for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        expected = model.state_dict()[name]
        assert float((merged.state_dict()[name] - expected).norm() / expected.norm()) < 1e-5, name

    with pytest.raises(SystemExit, match="--merged and --export-rank write to another --output-dir"):
        cli.main(["edit", *editing, "--requests", str(weeks[0]), "--state-dir", str(state_dir), "--merged"])


TINY_EDIT = tiny_edit_flags(v_num_grad_steps=5)


def edit_inputs(tmp_path, model_dir) -> list[str]:
    """`--model`, `--requests`, `--corpus` and a statistics cache for a quick tiny edit."""
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps(r) + "\n" for r in subject_final_requests()))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(tiny_corpus()))
    return [
        "--model",
        str(model_dir),
        "--requests",
        str(requests),
        "--corpus",
        str(corpus),
        "--stats_cache_dir",
        str(tmp_path / "stats"),
        *TINY_EDIT,
    ]


def test_edit_push_goes_through_editor_push_to_hub(saved_tiny_llama, tmp_path, capsys):
    """`--push_to_hub` pushes with `Editor.push_to_hub` (its commit message, its export of the held edits: the adapter,
    or the checkpoint with `--merged`, with metadata and card), not the output folder: no `.env`, no older file, no
    `edit_metrics.json`; none of the pushed files holds a token or a local path, and the pushed adapter is the one
    written locally."""
    out = tmp_path / "out"
    out.mkdir()
    (out / ".env").write_text("HF_TOKEN=hf_env\n")
    (out / "stale.bin").write_bytes(b"an older run")
    inputs = edit_inputs(tmp_path, saved_tiny_llama)
    hub_flags = ["--push_to_hub", "--hub_model_id", "me/edits", "--hub_token", "hf_secret"]
    with fake_dataset_hub(tmp_path / "hub") as hub:
        code = cli.main(
            ["edit", *inputs, "--output-dir", str(out), *hub_flags, "--model_init_kwargs", '{"token": "hf_init"}']
        )
        assert code == 0 and "pushed to me/edits" in capsys.readouterr().out
        (upload,) = hub.uploads
        assert upload["message"] == "Add 4 fact edits (adapter)"  # `Editor.push_to_hub`'s own commit message
        exported = ["README.md", "adapter_config.json", "adapter_model.safetensors", "memit_edits.json"]
        assert upload["files"] == exported and hub.created[0]["token"] == "hf_secret"
        for path in hub.repo("me/edits").iterdir():
            content = path.read_bytes()
            assert b"hf_secret" not in content and b"hf_init" not in content, path.name
            assert str(tmp_path).encode() not in content, path.name  # output, corpus, requests and cache paths
        pushed = load_file(hub.repo("me/edits") / "adapter_model.safetensors")
        local = load_file(out / "adapter_model.safetensors")
        assert pushed.keys() == local.keys() and all(torch.equal(pushed[k], local[k]) for k in local)
        metrics = (out / "edit_metrics.json").read_text()
        assert "hf_secret" not in metrics and "hf_init" not in metrics
        assert json.loads(metrics)["args"]["output_dir"] == str(out)  # the local files keep the local paths
        # the folder itself is left as it was, besides the files written; no staging folder remains
        assert sorted(p.name for p in out.iterdir()) == sorted([*exported, "edit_metrics.json", ".env", "stale.bin"])

        assert cli.main(["edit", *inputs, "--merged", "--output-dir", str(tmp_path / "merged"), *hub_flags]) == 0
        merged_upload = hub.uploads[-1]
        assert merged_upload["message"] == "Add 4 fact edits (merged model)"
        assert {"config.json", "model.safetensors", "memit_edits.json", "README.md"} <= set(merged_upload["files"])
        assert not any(name.startswith("adapter") for name in merged_upload["files"])
        assert "edit_metrics.json" not in merged_upload["files"]


def test_edit_refuses_to_mix_an_adapter_and_a_merged_checkpoint(saved_tiny_llama, tmp_path, capsys):
    """`edit --merged` into a folder holding an adapter (and the reverse) stops before editing, naming the folder and
    the files; `--overwrite_output_dir` removes the other kind's files and writes the new artefact."""
    inputs, out = edit_inputs(tmp_path, saved_tiny_llama), tmp_path / "out"
    cli.main(["edit", *inputs, "--output-dir", str(out)])
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(SystemExit) as error:
        cli.main(["edit", *inputs, "--merged", "--output-dir", str(out)])
    message = str(error.value)
    assert message.startswith(f"memit-hf edit: error: The output folder {out} already holds a peft adapter")
    assert "(adapter_config.json, adapter_model.safetensors)" in message and "--overwrite_output_dir" in message
    assert "Edited" not in capsys.readouterr().out  # refused before the model was even loaded
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    cli.main(["edit", *inputs, "--merged", "--overwrite_output_dir", "--output-dir", str(out)])
    assert f"removed adapter_config.json, adapter_model.safetensors from {out}" in capsys.readouterr().out
    files = sorted(p.name for p in out.iterdir())
    assert not any(name.startswith("adapter") for name in files)
    assert files == sorted([*json.loads((out / "memit_edits.json").read_text())["files"], "edit_metrics.json"])
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert not getattr(loaded, "_hf_peft_config_loaded", False)  # a plain checkpoint, no adapter on top

    with pytest.raises(SystemExit, match=r"already holds a full model checkpoint \(config\.json, "):
        cli.main(["edit", *inputs, "--output-dir", str(out)])


SECRET = "sentinel-secret-0b7c"
HUB_SECRET = "hf_" + "Z9y8X7w6V5" * 4


def test_no_file_memit_hf_writes_holds_a_secret(saved_tiny_llama, tmp_path, capsys):
    """A token given as `hub_token` or as `model_init_kwargs["token"]` (the usual way to load a gated model) reaches
    no file: adapter, merged checkpoint, state, CLI outputs (`edit_metrics.json`, `evaluation.json`), pushed adapters
    and checkpoints, pushed statistics. Before, `model_init_kwargs["token"]` was in `memit_edits.json`,
    `editor_state.json`, `edit_metrics.json` and `evaluation.json`, and pushed."""
    from memit_hf import Editor
    from tests.testing_utils import tiny_editing_arguments

    inputs = edit_inputs(tmp_path, saved_tiny_llama)
    secrets = ["--hub_token", HUB_SECRET, "--model_init_kwargs", json.dumps({"token": SECRET})]
    with fake_dataset_hub(tmp_path / "hub") as hub:
        assert (
            cli.main(
                [
                    "edit",
                    *inputs,
                    *secrets,
                    "--output-dir",
                    str(tmp_path / "out"),
                    "--state-dir",
                    str(tmp_path / "state"),
                    "--push_to_hub",
                    "--hub_model_id",
                    "me/edits",
                ]
            )
            == 0
        )
        assert cli.main(["edit", *inputs, *secrets, "--merged", "--output-dir", str(tmp_path / "merged")]) == 0
        assert (
            cli.main(
                [
                    "evaluate",
                    *inputs[:4],
                    "--num-requests",
                    "2",
                    "--edit",
                    *inputs[4:],
                    *secrets,
                    "--output-dir",
                    str(tmp_path / "evaluation"),
                ]
            )
            == 0
        )
        assert (
            cli.main(["stats", "--model", str(saved_tiny_llama), *inputs[4:], *secrets, "--push_to_hub", "me/stats"])
            == 0
        )

        args = tiny_editing_arguments(tmp_path / "stats", hub_token=HUB_SECRET, model_init_kwargs={"token": SECRET})
        editor = Editor(str(saved_tiny_llama), args=args, stats_dataset=tiny_corpus())
        editor.edit(subject_final_requests()[:2])
        editor.save_adapter(tmp_path / "library" / "adapter")
        editor.merge_and_save(tmp_path / "library" / "merged")
        editor.save_state(tmp_path / "library" / "state")
        editor.push_to_hub("me/library-adapter")
        editor.push_to_hub("me/library-merged", merged=True)
    assert {"me/edits", "me/stats", "me/library-adapter", "me/library-merged"} <= {u["repo_id"] for u in hub.uploads}
    assert hub.created[0]["token"] == HUB_SECRET  # it was used, not only dropped
    scanned = 0
    for file in tmp_path.rglob("*"):
        if file.is_file():
            content = file.read_bytes()
            scanned += 1
            assert SECRET.encode() not in content and HUB_SECRET.encode() not in content, file
    assert scanned > 40
    assert (tmp_path / "evaluation" / "evaluation.json").is_file() and (
        tmp_path / "out" / "edit_metrics.json"
    ).is_file()


STATE_HOLDER = """
import sys
from memit_hf.editor_state import StateLock
with StateLock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.readline()
"""


def test_a_second_run_on_a_state_dir_stops_with_a_clear_message(saved_tiny_llama, tmp_path, capsys):
    """Two runs on one `--state-dir`: the one that holds the lock (another process here) goes on; the other stops
    before loading anything, saying so, and nothing of the state is lost; once the first is done, it runs."""
    import os
    import subprocess
    import sys

    inputs = edit_inputs(tmp_path, saved_tiny_llama)
    state = tmp_path / "state"
    assert cli.main(["edit", *inputs, "--algorithm", "memit_seq", "--state-dir", str(state)]) == 0
    before = {p.relative_to(state): p.read_bytes() for p in state.rglob("*") if p.is_file() and ".lock" not in p.name}
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo / "src")}
    holder = subprocess.Popen(
        [sys.executable, "-c", STATE_HOLDER, str(state)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit, match=rf"in use by another memit-hf run \(pid {holder.pid}"):
            cli.main(["edit", *inputs, "--algorithm", "memit_seq", "--state-dir", str(state)])
    finally:
        holder.communicate("\n", timeout=60)
    after = {p.relative_to(state): p.read_bytes() for p in state.rglob("*") if p.is_file() and ".lock" not in p.name}
    assert after == before
    capsys.readouterr()
    assert cli.main(["edit", *inputs, "--algorithm", "memit_seq", "--state-dir", str(state)]) == 0
    assert "batch 2, 8 edits so far" in capsys.readouterr().out


def test_version_is_the_package_version(capsys):
    import re

    import memit_hf

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    (version,) = re.findall(r'^version = "([^"]+)"$', pyproject, flags=re.MULTILINE)
    assert capsys.readouterr().out == f"memit-hf {version}\n" and memit_hf.__version__ == version


def test_edit_help_lists_the_z_and_loading_flags_and_they_parse(capsys):
    """`memit-hf edit --help` lists the flags of the z optimisation's stop rule, chunks and precision, the chat
    templates, the model loading and the statistics revision, and each parses into its `EditingArguments` field."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["edit", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    values = {
        "v_early_stop_margin": ("0.5", 0.5),
        "v_early_stop_patience": ("2", 2),
        "v_autocast_dtype": ("bfloat16", "bfloat16"),
        "context_template_chat": ("true", True),
        "v_batch_size": ("8", 8),
        "model_init_kwargs": ('{"dtype": "bfloat16"}', {"dtype": "bfloat16"}),
        "stats_repo_revision": ("v1.0", "v1.0"),
    }
    for flag in [*values, "merged", "export-rank"]:
        assert f"--{flag}" in text, flag
    argv = ["edit", "--requests", "r.jsonl"] + [
        item for name, (value, _) in values.items() for item in (f"--{name}", value)
    ]
    _, args = cli.parse_args(argv)
    assert {name: getattr(args, name) for name in values} == {name: parsed for name, (_, parsed) in values.items()}


def edit_argv(model_dir, tmp_path, records) -> list[str]:
    """`memit-hf edit` of `records` on a saved tiny model with the settings of `tiny_editing_arguments`."""
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps(r) + "\n" for r in records))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(tiny_corpus()))
    return [
        "edit",
        "--model",
        str(model_dir),
        "--requests",
        str(requests),
        "--corpus",
        str(corpus),
        *tiny_edit_flags(v_num_grad_steps=None),
        "--stats_cache_dir",
        str(tmp_path / "stats"),
    ]


def test_edit_merged_writes_the_edited_checkpoint(saved_tiny_llama, tmp_path, capsys):
    """`edit --merged` writes the edited model as a full checkpoint (no adapter), bit for bit the library's edit with
    the same arguments; the model is loaded with `--model_init_kwargs` (bfloat16 here) and the z optimisation stops
    on `--v_early_stop_margin` / `--v_early_stop_patience` (every target leads by -1000 nats: 2 steps each)."""
    from memit_hf.editor import Editor

    argv = edit_argv(saved_tiny_llama, tmp_path, subject_final_requests())
    argv += [
        "--v_num_grad_steps",
        "10",
        "--v_early_stop_margin",
        "-1000",
        "--v_early_stop_patience",
        "2",
        "--model_init_kwargs",
        '{"dtype": "bfloat16"}',
        "--output-dir",
        str(tmp_path / "merged"),
    ]
    assert cli.main([*argv, "--merged"]) == 0
    assert "wrote the edited checkpoint" in capsys.readouterr().out
    files = {path.name for path in (tmp_path / "merged").iterdir()}
    assert {"config.json", "model.safetensors", "memit_edits.json", "README.md", "edit_metrics.json"} <= files
    assert not {"adapter_config.json", "adapter_model.safetensors"} & files
    summary = json.loads((tmp_path / "merged" / "edit_metrics.json").read_text())
    assert summary["metrics"]["z_mean_steps"] == 2.0 and "adapter_bytes" not in summary["metrics"]

    _, args = cli.parse_args(argv)
    editor = Editor(str(saved_tiny_llama), args=args, stats_dataset=[tmp_path / "corpus.txt"])
    output = editor.edit(subject_final_requests())
    expected = editor.model.state_dict()
    saved = load_file(tmp_path / "merged" / "model.safetensors")
    assert all(torch.equal(tensor, expected[name]) for name, tensor in saved.items())
    base = load_file(saved_tiny_llama / "model.safetensors")
    edited = sorted(name for name, tensor in saved.items() if not torch.equal(tensor, base[name].to(tensor.dtype)))
    assert edited == [f"{delta.module_name}.weight" for delta in output.deltas]
    assert {tensor.dtype for tensor in saved.values()} == {torch.bfloat16}


def test_edit_export_rank_writes_a_truncated_adapter(saved_tiny_llama, tmp_path):
    """`edit --export-rank 1` stores each module's best rank-1 approximation of the exact update (Eckart-Young: the
    leading singular triple) and reports its relative error, the discarded singular values' share."""
    argv = edit_argv(saved_tiny_llama, tmp_path, subject_final_requests()) + ["--v_num_grad_steps", "5"]
    cli.main([*argv, "--output-dir", str(tmp_path / "exact")])
    cli.main([*argv, "--output-dir", str(tmp_path / "rank1"), "--export-rank", "1"])
    assert json.loads((tmp_path / "exact" / "adapter_config.json").read_text())["r"] == 4
    assert json.loads((tmp_path / "rank1" / "adapter_config.json").read_text())["r"] == 1
    exact, low = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("exact", "rank1"))
    errors = []
    for i in (0, 1):
        prefix = f"base_model.model.model.layers.{i}.mlp.down_proj"
        dense = exact[f"{prefix}.lora_B.weight"].double() @ exact[f"{prefix}.lora_A.weight"].double()
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
        best = s[0] * torch.outer(u[:, 0], vh[0])
        lora_B, lora_A = low[f"{prefix}.lora_B.weight"], low[f"{prefix}.lora_A.weight"]
        assert lora_B.shape == (32, 1) and lora_A.shape == (1, 64)
        assert float((lora_B.double() @ lora_A.double() - best).norm() / best.norm()) < 1e-5  # float32 factors
        errors.append(float(s[1:].norm() / s.norm()))
    metrics = {
        name: json.loads((tmp_path / name / "edit_metrics.json").read_text())["metrics"] for name in ("exact", "rank1")
    }
    assert metrics["exact"]["adapter_max_reconstruction_error"] == 0.0
    assert metrics["rank1"]["adapter_max_reconstruction_error"] == pytest.approx(max(errors), rel=1e-5)
    assert min(errors) > 0.01  # rank 1 really loses part of each update


def test_keep_history_on_the_command_line_counts_every_batch(saved_tiny_llama, tmp_path, capsys):
    """`--keep_history 0` consolidates every batch of a `--state-dir` sequence; the run still reports (and the state
    still holds) all of them, and the state's batch adapters are only those that can be rolled back."""
    from memit_hf.editor_state import read_state

    inputs = edit_inputs(tmp_path, saved_tiny_llama)
    state = tmp_path / "state"
    for _ in range(2):
        assert (
            cli.main(["edit", *inputs, "--algorithm", "memit_seq", "--keep_history", "0", "--state-dir", str(state)])
            == 0
        )
    assert "batch 2, 8 edits so far" in capsys.readouterr().out
    metrics = json.loads((state / "edit_metrics.json").read_text())
    assert (metrics["num_edits_total"], metrics["num_batches"]) == (8, 2)
    saved = read_state(state)
    assert saved.num_edits == 8 and saved.batches == [] and len(saved.floor.batches) == 2
    assert not (state / "batches").exists() and json.loads((state / "memit_edits.json").read_text())["num_edits"] == 8
