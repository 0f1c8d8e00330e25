"""The adapter metadata warning is said when it matters: at export time, not at `edit()`."""

import logging

from memit_hf import Editor
from memit_hf.models import load_model_and_tokenizer
from tests.testing_utils import (
    build_tiny_causal_lm,
    build_tiny_tokenizer,
    subject_final_requests,
    tiny_corpus,
    tiny_editing_arguments,
)


def test_unnamed_base_model_warns_at_export_only(tmp_path, caplog):
    tokenizer = build_tiny_tokenizer()
    build_tiny_causal_lm("llama", vocab_size=len(tokenizer)).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    model, tokenizer = load_model_and_tokenizer(tmp_path / "model")  # a temporary path: not recorded in adapters
    editor = Editor(
        model,
        args=tiny_editing_arguments(tmp_path / "stats", v_num_grad_steps=2),
        processing_class=tokenizer,
        stats_dataset=tiny_corpus(),
    )
    with caplog.at_level(logging.WARNING, logger="memit_hf"):
        editor.edit(subject_final_requests())
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    with caplog.at_level(logging.WARNING, logger="memit_hf"):
        editor.save_adapter(tmp_path / "adapter")
    assert "The adapter records no `base_model_name_or_path`" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="memit_hf"):
        editor.save_adapter(tmp_path / "named", base_model_name_or_path="org/tiny")
    assert "base_model_name_or_path" not in caplog.text
