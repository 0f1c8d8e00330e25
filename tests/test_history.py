"""Tests of `memit_hf.history`: the typed batch record, and the edit history that owns the batches, the applied
updates, the merge mode, the consolidated floor and the method's state (transactions, rollback, reset, load)."""

import copy

import pytest
import torch

from memit_hf.algorithms import get_algorithm
from memit_hf.deltas import LayerDelta
from memit_hf.editor import Editor
from memit_hf.history import BatchRecord, EditHistory, EditOutput, StateMismatchError
from tests.testing_utils import (
    build_tiny_causal_lm,
    build_tiny_tokenizer,
    changed_tensors,
    parameters_snapshot,
    subject_final_requests,
    tiny_corpus,
    tiny_editing_arguments,
)


NAME = "model.layers.0.mlp.down_proj"


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def random_delta(model, seed: int, rank: int = 2) -> LayerDelta:
    generator = torch.Generator().manual_seed(seed)
    weight = model.get_submodule(NAME).weight
    lora_B = torch.randn(weight.shape[0], rank, generator=generator, dtype=torch.float64) * 1e-2
    lora_A = torch.randn(rank, weight.shape[1], generator=generator, dtype=torch.float64)
    return LayerDelta(NAME, lora_B, lora_A, False)


def batch_of(delta: LayerDelta, index: int) -> EditOutput:
    record = BatchRecord(algorithm="memit", layers=[0], num_requests=1, requests=[{"prompt": f"p{index}"}])
    return EditOutput(deltas=[delta], metrics={}, requests=[], record=record)


def test_batch_record_round_trips_and_reads_the_older_form():
    record = BatchRecord(
        algorithm="memit",
        layers=[3, 4],
        num_requests=2,
        hyperparameters={"kl_factor": 0.0625},
        statistics={NAME: {"key": "abc"}},
        requests=[{"prompt": "a"}, {"prompt": "b"}],
        metrics={"total_seconds": 1.5},
        extra={"source": {"requests": "edits.jsonl"}},
    )
    values = record.to_dict()
    assert list(values)[:7] == [
        "algorithm",
        "layers",
        "num_requests",
        "hyperparameters",
        "statistics",
        "requests",
        "metrics",
    ]
    assert values["source"] == {"requests": "edits.jsonl"}
    assert BatchRecord.from_dict(values) == record
    # Records written before the split kept `algorithm` and `layers` inside the hyperparameters too: one copy now.
    older = {**values, "hyperparameters": {"algorithm": "memit", "layers": [3, 4], "kl_factor": 0.0625}}
    assert BatchRecord.from_dict(older) == record
    with pytest.raises(ValueError, match="`layers`"):
        BatchRecord.from_dict({**values, "layers": "3"})
    with pytest.raises(ValueError, match="`metrics`"):
        BatchRecord.from_dict({**values, "metrics": [1]})


def test_a_failed_transaction_leaves_weights_and_method_state_bit_identical():
    model = build_tiny_causal_lm("llama", vocab_size=64)
    history = EditHistory(model)
    algorithm = get_algorithm("memit_seq", {"mom2_update_weight": 1.0})
    history.algorithm = algorithm
    before = parameters_snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        with history.transaction(algorithm):
            history.apply(random_delta(model, 0), merge=True)
            algorithm.accumulate_gram(NAME, "key_gram", torch.ones(2, 4, dtype=torch.float64))
            raise RuntimeError("boom")
    assert changed_tensors(model, before) == [] and algorithm.state_dict() == {} and len(history) == 0
    with history.transaction(algorithm):
        history.apply(random_delta(model, 0), merge=True)
        algorithm.accumulate_gram(NAME, "key_gram", torch.ones(2, 4, dtype=torch.float64))
    assert changed_tensors(model, before) == [NAME + ".weight"] and list(algorithm.state_dict()) == [
        NAME + "::key_gram"
    ]


@pytest.mark.parametrize("merge", [True, False])
def test_rollback_reset_and_consolidation_are_bit_exact(merge):
    model = build_tiny_causal_lm("llama", vocab_size=64)
    history = EditHistory(model)
    ids = torch.arange(12)[None]
    snapshots, outputs = [parameters_snapshot(model)], [model(input_ids=ids).logits]
    for i in range(3):
        delta = random_delta(model, i)
        history.apply(delta, merge)
        history.append(batch_of(delta, i), merge)
        snapshots.append(parameters_snapshot(model))
        outputs.append(model(input_ids=ids).logits)
    assert history.num_edits == 3 and len(history.held_deltas()) == 3
    with pytest.raises(ValueError, match="merge_edits=False" if merge else "merge_edits=True"):
        history.check_merge_mode(not merge)
    history.rollback(1)
    assert changed_tensors(model, snapshots[2]) == [] and torch.equal(model(input_ids=ids).logits, outputs[2])
    with pytest.raises(ValueError, match="between 1 and the number of edits held \\(2\\)"):
        history.rollback(3)
    if merge:  # consolidation folds merged batches into the floor, the weights kept bit for bit
        history.consolidate(1)
        assert len(history) == 1 and [r.requests for r in history.records()] == [
            [{"prompt": "p0"}],
            [{"prompt": "p1"}],
        ]
        assert changed_tensors(model, snapshots[2]) == []
        history.rollback(1)
        assert changed_tensors(model, snapshots[1]) == []
        with pytest.raises(ValueError, match="1 more are consolidated"):
            history.rollback(1)
    history.reset()
    assert changed_tensors(model, snapshots[0]) == [] and history.records() == [] and history.merged is None


def test_the_method_state_must_continue_with_its_statistics(tokenizer, tmp_path):
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    args = tiny_editing_arguments(tmp_path / "stats", algorithm="memit_seq")
    editor = Editor(model, args=args, processing_class=tokenizer, stats_dataset=tiny_corpus())
    editor.edit(subject_final_requests()[:2])
    statistics = editor.get_statistics(args.layers)
    other = {name: copy.copy(s) for name, s in statistics.items()}
    for layer_statistics in other.values():
        layer_statistics.key = "another-corpus"
    editor.edit_history.check_statistics(editor.algorithm, statistics)  # the same statistics continue
    with pytest.raises(StateMismatchError, match="another-corpus"):
        editor.edit_history.check_statistics(editor.algorithm, other)


def test_load_state_needs_an_editor_without_edits(tokenizer, tmp_path):
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    args = tiny_editing_arguments(tmp_path / "stats")
    editor = Editor(model, args=args, processing_class=tokenizer, stats_dataset=tiny_corpus())
    editor.edit(subject_final_requests()[:2])
    state = editor.editor_state()
    with pytest.raises(ValueError, match="holds no edit"):
        editor.load_state(state)
    original = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    fresh = Editor(original, args=args, processing_class=tokenizer, stats_dataset=tiny_corpus())
    fresh.load_state(state)
    assert changed_tensors(original, parameters_snapshot(model)) == []
    assert [o.record for o in fresh.history] == [o.record for o in editor.history]
