"""A clean run is quiet: `memit-hf edit` and `memit-hf demo` on the embedded SmolLM2 emit no warning (Python
warnings or log records at WARNING and above), and the model-card metadata warning appears at export time only."""

import logging
import warnings
from pathlib import Path

import pytest

from memit_hf import cli


pytestmark = pytest.mark.integration

CORPUS = Path(__file__).parent / "data" / "stats_corpus.txt"
FAST = ["--v_num_grad_steps", "3", "--num_context_templates", "1", "--stats_num_tokens", "4000"]


def run_quietly(argv, caplog):
    """Run a `memit-hf` command with every warning recorded (none pre-filtered) and WARNING logs captured."""
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        assert cli.main(argv) == 0
    loud = [record for record in caplog.records if record.levelno >= logging.WARNING]
    return [f"{w.category.__name__}: {w.message}" for w in caught], [r.getMessage() for r in loud]


def test_edit_on_the_embedded_model_is_quiet(tmp_path, caplog):
    requests = tmp_path / "requests.jsonl"
    requests.write_text(
        '{"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"}\n'
    )
    argv = ["edit", "--requests", str(requests), "--corpus", str(CORPUS), "--output-dir", str(tmp_path / "out")]
    caught, logged = run_quietly([*argv, *FAST, "--stats_cache_dir", str(tmp_path / "stats")], caplog)
    assert caught == [] and logged == []
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_demo_on_the_embedded_model_is_quiet(tmp_path, caplog, capsys):
    argv = ["demo", "--corpus", str(CORPUS), *FAST, "--stats_cache_dir", str(tmp_path / "stats")]
    caught, logged = run_quietly(argv, caplog)
    assert caught == [] and logged == []
    assert "Adapter disabled:" in capsys.readouterr().out
