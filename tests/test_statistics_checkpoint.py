"""Resumable statistics: a collection interrupted (by `max_batches`, or by a crash between checkpoints) and resumed
from its checkpoint gives sums bit-identical to an uninterrupted one; unusable checkpoints are ignored; the provider
resumes what an interrupted run left and removes the checkpoint once the statistics are cached."""

import multiprocessing
import os
from unittest import mock

import pytest
import torch
from safetensors import safe_open

from memit_hf.arguments import EditingArguments
from memit_hf.editor import Editor
from memit_hf.files import host_name
from memit_hf.statistics import (
    CollectionInterrupted,
    CollectionProgress,
    StatisticsCheckpoint,
    collect_second_moments,
    collection_key,
    pack_batches,
    temporary_owner,
    temporary_path,
    token_pieces,
)
from tests.testing_utils import build_tiny_causal_lm, build_tiny_tokenizer, tiny_corpus, tiny_editing_arguments


MODULES = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
BATCH_TOKENS = 128


@pytest.fixture(scope="module")
def setup():
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    pieces = token_pieces(tokenizer, tiny_corpus(), num_tokens=1500, max_length=32, seed=0)
    full = collect_second_moments(model, tokenizer, MODULES, pieces, BATCH_TOKENS, show_progress=False)
    return model, tokenizer, pieces, full


def collect(setup, checkpoint=None, max_batches=None):
    model, tokenizer, pieces, _ = setup
    return collect_second_moments(
        model,
        tokenizer,
        MODULES,
        pieces,
        BATCH_TOKENS,
        show_progress=False,
        checkpoint=checkpoint,
        max_batches=max_batches,
    )


def assert_bit_identical(result, expected):
    assert list(result) == list(expected)
    for name in expected:
        assert torch.equal(result[name].total, expected[name].total), name
        assert result[name].count == expected[name].count


def saved_position(checkpoint: StatisticsCheckpoint) -> int:
    with safe_open(str(checkpoint.path), framework="pt") as handle:
        return int(handle.metadata()["position"])


@pytest.mark.parametrize("every, stop", [(3, 7), (1, 1), (None, 5), (4, 11)])
def test_interrupted_and_resumed_equals_uninterrupted(setup, tmp_path, caplog, every, stop):
    num_batches = len(pack_batches(setup[2], BATCH_TOKENS))
    assert num_batches == 13 and stop < num_batches
    with pytest.raises(CollectionInterrupted, match=f"{stop} of {num_batches} batches"):
        collect(setup, StatisticsCheckpoint(tmp_path, "key", every_batches=every), max_batches=stop)
    checkpoint = StatisticsCheckpoint(tmp_path, "key", every_batches=every)
    assert saved_position(checkpoint) == stop  # a `max_batches` stop saves where it stopped
    # Two more slices, then the rest: each call continues from the last.
    with pytest.raises(CollectionInterrupted):
        collect(setup, checkpoint, max_batches=1)
    assert saved_position(checkpoint) == stop + 1
    with caplog.at_level("INFO", logger="memit_hf.statistics.collection"):
        resumed = collect(setup, checkpoint)
    assert f"Resuming the statistics collection at batch {stop + 1} of {num_batches}" in caplog.text
    assert_bit_identical(resumed, setup[3])


class Crash(RuntimeError):
    pass


def crash_on_forward(model, number: int):
    """A forward pre-hook on the first block that raises on its `number`-th call (1-based): a crash mid-pass."""
    calls = []

    def hook(module, args):
        calls.append(1)
        if len(calls) == number:
            raise Crash(f"forward {number}")

    return model.model.layers[0].register_forward_pre_hook(hook)


@pytest.mark.parametrize(
    "checkpoint_kwargs, expected_position",
    [
        ({"every_batches": 3}, 6),  # batches 7 and 8 were lost with the crash and are summed again
        ({"every_seconds": 1e-9}, 8),  # a save after every batch
    ],
)
def test_a_crash_resumes_from_the_last_periodic_checkpoint(
    setup, tmp_path, caplog, checkpoint_kwargs, expected_position
):
    model = setup[0]
    handle = crash_on_forward(model, 9)
    try:
        with pytest.raises(Crash):
            collect(setup, StatisticsCheckpoint(tmp_path, "key", **checkpoint_kwargs))
    finally:
        handle.remove()
    checkpoint = StatisticsCheckpoint(tmp_path, "key", **checkpoint_kwargs)
    assert saved_position(checkpoint) == expected_position
    with caplog.at_level("INFO", logger="memit_hf.statistics.collection"):
        resumed = collect(setup, checkpoint)
    assert f"at batch {expected_position} of 13" in caplog.text
    assert_bit_identical(resumed, setup[3])
    assert not list(tmp_path.glob("*.tmp"))


def test_checkpoints_follow_their_schedule(setup, tmp_path):
    collect(setup, StatisticsCheckpoint(tmp_path, "none"))
    assert list(tmp_path.iterdir()) == []
    every = StatisticsCheckpoint(tmp_path, "every", every_batches=1)
    assert_bit_identical(collect(setup, every), setup[3])
    assert saved_position(every) == 12  # never after the last batch: the complete sums are the caller's to store
    # A checkpoint of a finished share (a crash after the pass, before the statistics were stored) resumes with
    # nothing left to sum.
    every.save(
        CollectionProgress({n: m.total.clone() for n, m in setup[3].items()}, setup[3][MODULES[0]].count, 13), 13
    )
    assert_bit_identical(collect(setup, every), setup[3])


def write_progress(checkpoint, dims, position=5, count=100, num_batches=13):
    totals = {name: torch.full((dim, dim), 7.0, dtype=torch.float64) for name, dim in dims.items()}
    checkpoint.save(CollectionProgress(totals, count, position), num_batches)


@pytest.mark.parametrize("damage", ["modules", "num_batches", "shape", "truncated", "key"])
def test_unusable_checkpoints_are_ignored(setup, tmp_path, caplog, damage):
    dims = dict.fromkeys(MODULES, 64)
    checkpoint = StatisticsCheckpoint(tmp_path, "key")
    if damage == "modules":
        write_progress(checkpoint, {MODULES[0]: 64})
    elif damage == "num_batches":
        write_progress(checkpoint, dims, num_batches=12)
    elif damage == "shape":
        write_progress(checkpoint, dict.fromkeys(MODULES, 63))
    elif damage == "truncated":
        write_progress(checkpoint, dims)
        checkpoint.path.write_bytes(checkpoint.path.read_bytes()[:200])
    else:
        write_progress(StatisticsCheckpoint(tmp_path, "other"), dims)
        StatisticsCheckpoint(tmp_path, "other").path.rename(checkpoint.path)
    assert checkpoint.load(dims, 13) is None
    assert "Ignoring unusable statistics checkpoint" in caplog.text
    assert_bit_identical(collect(setup, checkpoint), setup[3])  # a fresh start, not the planted sums
    write_progress(checkpoint, dims)
    loaded = checkpoint.load(dims, 13)
    assert loaded.position == 5 and loaded.count == 100 and float(loaded.totals[MODULES[1]][3, 4]) == 7.0


def test_checkpoints_of_another_number_of_processes_are_ignored_and_removed(setup, tmp_path, caplog):
    dims = dict.fromkeys(MODULES, 64)
    other = StatisticsCheckpoint(tmp_path, "key", process_index=1, num_processes=2)
    write_progress(other, dims, num_batches=6)
    mine = StatisticsCheckpoint(tmp_path, "key")
    assert mine.others() == [other.path]
    assert mine.load(dims, 13) is None
    assert "Ignoring statistics checkpoints of another number of processes" in caplog.text
    mine.remove()
    assert other.path.exists()  # other processes' files are the main process's to remove
    mine.remove(others=True)
    assert not other.path.exists()


def test_collection_key_follows_the_modules_and_the_batches():
    first, second = {"module": "a", "x": 1}, {"module": "b", "x": 1}
    key = collection_key([first, second], 4096)
    assert collection_key([second, first], 4096) == key
    assert collection_key([first, second], 2048) != key
    assert collection_key([first], 4096) != key
    assert collection_key([first, {"module": "b", "x": 2}], 4096) != key


def test_the_provider_resumes_an_interrupted_collection_and_removes_the_checkpoint(tmp_path, caplog):
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))

    def editor(cache_dir, **overrides):
        args = tiny_editing_arguments(
            cache_dir,
            stats_num_tokens=1500,
            stats_max_length=32,
            stats_batch_tokens=128,
            stats_checkpoint_every=2,
            **overrides,
        )
        return Editor(model, args=args, processing_class=tokenizer, stats_dataset=tiny_corpus())

    expected = editor(tmp_path / "uninterrupted").get_statistics([0, 1])
    first = editor(tmp_path / "stats")
    checkpoint = first.statistics.checkpoint([0, 1])
    assert checkpoint.every_batches == 2 and checkpoint.every_seconds == 600.0
    with pytest.raises(CollectionInterrupted):
        collect_second_moments(
            model,
            tokenizer,
            MODULES,
            first.statistics.corpus_pieces(),
            128,
            show_progress=False,
            checkpoint=checkpoint,
            max_batches=5,
        )
    assert [path.name for path in (tmp_path / "stats").iterdir()] == [checkpoint.path.name]
    second = editor(tmp_path / "stats")
    with caplog.at_level("INFO", logger="memit_hf.statistics.collection"):
        resumed = second.get_statistics([0, 1])
    assert "Resuming the statistics collection at batch 5 of 13" in caplog.text
    for name, layer in expected.items():
        assert resumed[name].source == "collected" and resumed[name].key == layer.key
        assert torch.equal(resumed[name].moment.total, layer.moment.total) and resumed[name].count == layer.count
    assert not list((tmp_path / "stats").glob("*.ckpt"))
    assert len(list((tmp_path / "stats").glob("*.safetensors"))) == 2


def test_checkpoint_arguments_are_validated():
    with pytest.raises(ValueError, match="`stats_checkpoint_every` must be a positive integer or None, got 0"):
        EditingArguments(stats_checkpoint_every=0)
    with pytest.raises(ValueError, match="`stats_checkpoint_seconds` must be positive or None"):
        EditingArguments(stats_checkpoint_seconds=-1.0)
    assert EditingArguments(stats_checkpoint_seconds=None).stats_checkpoint_seconds is None


def save_then_die(directory: str) -> None:
    """Spawned: a checkpoint save killed after writing its file and before renaming it over the checkpoint."""
    with mock.patch("os.replace", side_effect=lambda *args: os._exit(3)):
        write_progress(StatisticsCheckpoint(directory, "key"), dict.fromkeys(MODULES, 64))


def test_the_next_save_removes_what_a_killed_save_left(tmp_path):
    process = multiprocessing.get_context("spawn").Process(target=save_then_die, args=(str(tmp_path),))
    process.start()
    process.join(timeout=300)
    assert process.exitcode == 3
    checkpoint = StatisticsCheckpoint(tmp_path, "key")
    (left,) = tmp_path.iterdir()  # the partial sums, in a folder that names the killed process
    assert temporary_owner(left) == (host_name(), process.pid) and not checkpoint.path.exists()
    assert [path.name for path in left.iterdir()] == [checkpoint.path.name]
    running = temporary_path(checkpoint.path)  # a save of a process that still runs (this one) is left alone
    running.mkdir()
    write_progress(checkpoint, dict.fromkeys(MODULES, 64))
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([checkpoint.path.name, running.name])
    assert checkpoint.load(dict.fromkeys(MODULES, 64), 13).position == 5
