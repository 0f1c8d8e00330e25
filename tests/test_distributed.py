"""Several CPU processes (gloo, via accelerate's debug_launcher): statistics split and summed (2, 3 and 4 processes,
uneven shares, fewer batches than processes, interrupted and resumed from per-process checkpoints), z optimisation
sharded by whole chunks and put back by index, all equal to one process's result."""

import json
import os

import pytest
import torch
from accelerate import debug_launcher
from safetensors.torch import load_file, save_file

from memit_hf.distributed import owned_chunks, process_state
from memit_hf.statistics import (
    CollectionInterrupted,
    StatisticsCheckpoint,
    collect_second_moments,
    corpus_texts,
    pack_batches,
    token_pieces,
)
from tests.testing_utils import build_tiny_causal_lm, build_tiny_tokenizer, tiny_corpus, tiny_edit_flags


MODULES = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


def _moments():
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    pieces = token_pieces(tokenizer, tiny_corpus(), num_tokens=3000, max_length=32, seed=0)
    return collect_second_moments(model, tokenizer, MODULES, pieces, batch_tokens=128, show_progress=False)


def _fresh_state():
    """Forked workers inherit the parent's (single-process) state singleton: drop it so each sees the group. The
    new state sets torch's thread count for CPU processes (accelerate), so one thread is set again afterwards: the
    thread count changes the reduction order of matrix products, and with it the last bits of every result."""
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()
    state = process_state()
    assert state.num_processes == int(os.environ["MEMIT_TEST_PROCESSES"]), state
    torch.set_num_threads(1)
    return state


def _distributed_worker():
    _fresh_state()
    moments = _moments()
    state = process_state()
    if state.is_main_process:
        tensors = {name: m.total for name, m in moments.items()}
        tensors["count"] = torch.tensor([next(iter(moments.values())).count])
        save_file(tensors, os.environ["MEMIT_TEST_OUT"])
    state.wait_for_everyone()


def test_two_processes_match_one(tmp_path, monkeypatch):
    out = tmp_path / "moments.safetensors"
    monkeypatch.setenv("MEMIT_TEST_OUT", str(out))
    monkeypatch.setenv("MEMIT_TEST_PROCESSES", "2")
    debug_launcher(_distributed_worker, num_processes=2)
    distributed = load_file(str(out))
    single = _moments()
    assert int(distributed["count"]) == next(iter(single.values())).count
    for name in MODULES:
        torch.testing.assert_close(distributed[name], single[name].total, rtol=1e-6, atol=1e-6)


def _split_setup(num_tokens):
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    pieces = token_pieces(tokenizer, tiny_corpus(), num_tokens=num_tokens, max_length=32, seed=0)
    return model, tokenizer, pieces


def _split_worker():
    """Collect once uninterrupted, then again stopped by `max_batches` before the end of the largest share (every
    process stops, each saving its checkpoint, also those with a finished or empty share) and resumed."""
    state = _fresh_state()
    model, tokenizer, pieces = _split_setup(int(os.environ["MEMIT_TEST_TOKENS"]))
    num_batches = len(pack_batches(pieces, 128))
    plain = collect_second_moments(model, tokenizer, MODULES, pieces, batch_tokens=128, show_progress=False)
    checkpoint = StatisticsCheckpoint(
        os.environ["MEMIT_TEST_CHECKPOINTS"],
        "key",
        every_batches=1,
        process_index=state.process_index,
        num_processes=state.num_processes,
    )
    stop = -(-num_batches // state.num_processes) - 1
    try:
        collect_second_moments(model, tokenizer, MODULES, pieces, 128, False, checkpoint=checkpoint, max_batches=stop)
        interrupted = 0
    except CollectionInterrupted:
        interrupted = 1
    state.wait_for_everyone()
    saved = int(checkpoint.path.exists())
    resumed = collect_second_moments(model, tokenizer, MODULES, pieces, 128, False, checkpoint=checkpoint)
    tensors = {f"plain:{name}": m.total for name, m in plain.items()}
    tensors.update({f"resumed:{name}": m.total for name, m in resumed.items()})
    tensors["counts"] = torch.tensor([plain[MODULES[0]].count, resumed[MODULES[0]].count])
    tensors["flags"] = torch.tensor([interrupted, saved, len(owned_chunks(num_batches, state))])
    save_file(tensors, os.environ["MEMIT_TEST_OUT"] + f"-rank{state.process_index}")
    state.wait_for_everyone()


@pytest.mark.parametrize(
    "num_processes, num_tokens, num_batches",
    [
        (2, 500, 5),
        (3, 500, 5),
        (4, 500, 5),  # uneven shares
        (3, 100, 2),
        (4, 100, 2),  # fewer batches than processes: some processes sum nothing
    ],
)
def test_statistics_split_between_any_number_of_processes(
    tmp_path, monkeypatch, num_processes, num_tokens, num_batches
):
    """Every process gets whole batches round-robin (no padding, no batch twice); the reduced sums equal one
    process's up to the order of the float64 additions, with the exact token count, on every process. A collection
    interrupted on every process and resumed from each process's checkpoint gives bit-identical sums."""
    model, tokenizer, pieces = _split_setup(num_tokens)
    assert len(pack_batches(pieces, 128)) == num_batches
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: the float32 products of each batch are then the same bits
    try:
        single = collect_second_moments(model, tokenizer, MODULES, pieces, batch_tokens=128, show_progress=False)
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setenv("MEMIT_TEST_OUT", str(tmp_path / "moments"))
    monkeypatch.setenv("MEMIT_TEST_CHECKPOINTS", str(tmp_path / "checkpoints"))
    monkeypatch.setenv("MEMIT_TEST_TOKENS", str(num_tokens))
    monkeypatch.setenv("MEMIT_TEST_PROCESSES", str(num_processes))
    debug_launcher(_split_worker, num_processes=num_processes)
    ranks = [load_file(str(tmp_path / f"moments-rank{rank}")) for rank in range(num_processes)]
    shares = [int(result["flags"][2]) for result in ranks]
    assert shares == [len(range(rank, num_batches, num_processes)) for rank in range(num_processes)]
    assert sum(shares) == num_batches and min(shares) == (
        0 if num_batches < num_processes else num_batches // num_processes
    )
    for result in ranks:
        assert result["flags"][:2].tolist() == [1, 1]  # every process stopped and left a checkpoint
        assert result["counts"].tolist() == [single[MODULES[0]].count] * 2 == [num_tokens] * 2
        for name in MODULES:
            expected = single[name].total
            assert torch.equal(result[f"resumed:{name}"], result[f"plain:{name}"]), name
            assert torch.equal(result[f"plain:{name}"], ranks[0][f"plain:{name}"])  # the same on every process
            # float64 re-association of `num_batches` float32-exact terms: at most that many roundings
            bound = num_batches * torch.finfo(torch.float64).eps * float(expected.abs().max())
            torch.testing.assert_close(result[f"plain:{name}"], expected, rtol=0, atol=bound)


def _edit(cache_dir, num_requests):
    from memit_hf.editor import Editor
    from tests.testing_utils import subject_final_requests, tiny_editing_arguments

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    args = tiny_editing_arguments(cache_dir, v_batch_size=2)
    editor = Editor(model, args=args, processing_class=tokenizer, stats_dataset=tiny_corpus())
    requests = (subject_final_requests() * 2)[:num_requests]  # chunks of 2 requests: uneven shares per process
    return editor.edit(requests)


def _distributed_edit_worker():
    _fresh_state()
    output = _edit(os.environ["MEMIT_TEST_CACHE"], int(os.environ["MEMIT_TEST_REQUESTS"]))
    tensors = {"targets": output.values.targets, "steps": output.values.steps}
    tensors.update({d.module_name: d.dense() for d in output.deltas})
    save_file(tensors, os.environ["MEMIT_TEST_OUT"] + f"-rank{process_state().process_index}")
    process_state().wait_for_everyone()


# With accelerate's padded split (the old code) 5 requests on 4 processes gathered as [0, 1, 2, 4, 3, 4, 4, 4]: the
# grid covers every process count with one request (processes without work), 5, 6 and 7 (uneven shares).
@pytest.mark.parametrize("num_processes", [2, 3, 4])
@pytest.mark.parametrize("num_requests", [1, 5, 6, 7])
def test_processes_shard_the_z_optimisation_exactly(tmp_path, monkeypatch, num_processes, num_requests):
    """Each process optimises whole chunks of requests (some processes none); after the put-back every process holds
    every target value in request order, bit-identical to one process's (each chunk runs the same operations on the
    same inputs), and applies the same update. The statistics come from one shared cache, so the solves see the same
    second moments and the deltas are bit-identical too; collecting them on several processes is tested above."""
    single = _edit(tmp_path / "stats", num_requests)
    monkeypatch.setenv("MEMIT_TEST_OUT", str(tmp_path / "edit"))
    monkeypatch.setenv("MEMIT_TEST_CACHE", str(tmp_path / "stats"))
    monkeypatch.setenv("MEMIT_TEST_REQUESTS", str(num_requests))
    monkeypatch.setenv("MEMIT_TEST_PROCESSES", str(num_processes))
    debug_launcher(_distributed_edit_worker, num_processes=num_processes)
    ranks = [load_file(str(tmp_path / f"edit-rank{rank}")) for rank in range(num_processes)]
    for result in ranks:
        assert torch.equal(result["targets"], single.values.targets)
        assert torch.equal(result["steps"], single.values.steps)
        for delta in single.deltas:
            assert torch.equal(result[delta.module_name], delta.dense()), delta.module_name


def _cli_worker():
    from memit_hf import cli

    _fresh_state()
    for argv in json.loads(os.environ["MEMIT_TEST_ARGV"]):
        cli.main(argv)
    process_state().wait_for_everyone()


def test_stats_and_edit_commands_under_two_processes(tmp_path, monkeypatch):
    """What `accelerate launch -m memit_hf.cli stats|edit` runs: the statistics are collected by both processes
    (checkpointed, the checkpoints removed at the end) and cached once; the edit is written once, by the main
    process, and the other process ends without error."""
    from tests.testing_utils import subject_final_requests

    tokenizer = build_tiny_tokenizer()
    build_tiny_causal_lm("llama", vocab_size=len(tokenizer)).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "corpus.txt").write_text("\n\n".join(tiny_corpus()))
    (tmp_path / "requests.json").write_text(json.dumps(subject_final_requests()))
    common = [
        "--model",
        str(tmp_path / "model"),
        "--corpus",
        str(tmp_path / "corpus.txt"),
        "--layers",
        "0",
        "1",
        "--stats_cache_dir",
        str(tmp_path / "stats"),
        "--stats_batch_tokens",
        "128",
        "--stats_max_length",
        "32",
    ]
    argv = [
        ["stats", *common, "--stats_checkpoint_every", "1"],
        [
            "edit",
            *common,
            "--requests",
            str(tmp_path / "requests.json"),
            "--output-dir",
            str(tmp_path / "out"),
            *tiny_edit_flags(layers=None, v_num_grad_steps=None),
        ],
    ]
    monkeypatch.setenv("MEMIT_TEST_ARGV", json.dumps(argv))
    monkeypatch.setenv("MEMIT_TEST_PROCESSES", "2")
    debug_launcher(_cli_worker, num_processes=2)
    assert sorted(path.suffix for path in (tmp_path / "stats").iterdir()) == [".json"] * 2 + [".safetensors"] * 2
    written = sorted(path.name for path in (tmp_path / "out").iterdir())
    expected = {"adapter_config.json", "adapter_model.safetensors", "edit_metrics.json", "memit_edits.json"}
    assert expected <= set(written)
    statistics = json.loads((tmp_path / "out" / "memit_edits.json").read_text())["batches"][0]["statistics"]
    pieces = token_pieces(tokenizer, corpus_texts(tmp_path / "corpus.txt"), 100_000, 32, seed=42)
    assert [info["count"] for info in statistics.values()] == [sum(map(len, pieces))] * 2
