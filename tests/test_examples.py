"""The scripts in `examples/` run as written (on a tiny saved model, through the same parser as the CLI)."""

import importlib.util
import json
from pathlib import Path

import pytest

from tests.testing_utils import build_tiny_causal_lm, build_tiny_tokenizer, tiny_corpus, tiny_edit_flags


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY = tiny_edit_flags(v_num_grad_steps=20)


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("examples")
    tokenizer = build_tiny_tokenizer()
    build_tiny_causal_lm("llama", vocab_size=len(tokenizer)).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "corpus.txt").write_text("\n\n".join(tiny_corpus()))
    return root


def common_argv(root: Path) -> list[str]:
    return [
        "--model",
        str(root / "model"),
        "--corpus",
        str(root / "corpus.txt"),
        *TINY,
        "--stats_cache_dir",
        str(root / "stats"),
    ]


def test_every_example_is_tested():
    assert sorted(path.stem for path in EXAMPLES.glob("*.py")) == sorted(EXAMPLE_TESTS)


def requests_file(root: Path) -> str:
    """Subject-final prompts, which the tiny random models respond to (see `subject_final_requests`)."""
    path = root / "requests.jsonl"
    path.write_text(
        '{"prompt": "The city of {}", "subject": "the Eiffel Tower", "target_new": "Rome", "target_true": "Paris"}\n'
        '{"prompt": "I think {}", "subject": "the iPhone", "target_new": "Microsoft", "target_true": "Apple"}\n'
    )
    return str(path)


def run_edit_and_evaluate(root):
    metrics = load_example("edit_and_evaluate").main([*common_argv(root), "--requests", requests_file(root)])
    assert metrics["efficacy_success"] == 100.0
    # the unedited figures come from the original weights, where neither target is the argmax
    assert metrics["pre_efficacy_accuracy"] == 0.0 < metrics["efficacy_accuracy"]
    assert metrics["efficacy_magnitude"] > metrics["pre_efficacy_magnitude"]


def run_adapter_roundtrip(root):
    argv = [*common_argv(root), "--requests", requests_file(root), "--output_dir", str(root / "adapter")]
    answers = load_example("adapter_roundtrip").main(argv)
    assert answers["adapter"] == answers["edited"] != answers["adapter_disabled"]
    assert (root / "adapter" / "adapter_config.json").exists()


def run_weekly_corrections(root):
    weeks = []
    for i, record in enumerate(
        [
            {"prompt": "The city of {}", "subject": "the Eiffel Tower", "target_new": "Rome"},
            {"prompt": "I think {}", "subject": "the iPhone", "target_new": "Microsoft"},
        ]
    ):
        weeks.append(root / f"week{i}.json")
        weeks[-1].write_text(json.dumps([record]))
    state_dir = root / "state"
    argv = [*common_argv(root), "--algorithm", "memit_seq", "--state_dir", str(state_dir), "--weeks", *map(str, weeks)]
    answers = load_example("weekly_corrections").main(argv)
    # After week 2 both facts hold (the state carried week 1 over); rolling week 2 back gives week 1's answers.
    assert answers["week 2"][0] == " Rome" and " Microsoft".startswith(answers["week 2"][1])  # first target tokens
    assert answers["week 1"][0] == " Rome" and answers["rolled back"] == answers["week 1"]
    assert (state_dir / "editor_state.json").is_file() and (state_dir / "batches" / "0001").is_dir()


EXAMPLE_TESTS = {
    "edit_and_evaluate": run_edit_and_evaluate,
    "adapter_roundtrip": run_adapter_roundtrip,
    "weekly_corrections": run_weekly_corrections,
}


@pytest.mark.parametrize("name", sorted(EXAMPLE_TESTS))
def test_example_runs(name, tiny_files):
    EXAMPLE_TESTS[name](tiny_files)
