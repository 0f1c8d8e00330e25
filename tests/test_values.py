"""Tests of `memit_hf.values`: the batched z optimisation against one-request-at-a-time runs, its loss at the first
step against a plain forward, early stopping and the norm clamp."""

import math
from dataclasses import replace

import pytest
import torch

from memit_hf.architectures import get_layout
from memit_hf.keys import compute_keys_and_outputs, fill
from memit_hf.requests import load_requests
from memit_hf.settings import ValueOptimisation
from memit_hf.tokenization import encode_targets, encode_texts
from memit_hf.values import (
    PER_REQUEST_FIELDS,
    BlockRunner,
    StopRule,
    ZChunk,
    balanced_chunks,
    block_outputs,
    compute_target_values,
    default_chunk_size,
    optimise_target_values,
    plan_chunk_buckets,
    plan_chunks,
    plan_row_buckets,
    prefix_cache_error,
    prefix_cache_matches,
    prefix_cache_tolerance,
    row_bucket_overhead,
    suffix_lengths,
    target_margins,
)
from tests.testing_utils import build_tiny_causal_lm, build_tiny_tokenizer, subject_final_requests, tiny_requests


TEMPLATES = [["{}"], ["The river. {}", "I think it will. {}"]]
SETTINGS = dict(lr=0.5, weight_decay=0.001, clamp_norm_factor=4.0, kl_factor=0.0625, show_progress=False)
D_MODEL = 32  # the hidden size of every tiny model
EPS32 = torch.finfo(torch.float32).eps  # 1.19e-7
UNIT32 = EPS32 / 2  # float32 unit roundoff: one rounded operation is within UNIT32 x |result|


def z_rounding(num_steps: int) -> float:
    """The relative difference between the z of two optimisations that compute the same thing in another float32
    summation order (other padding, batch shapes or a KV cache). The block output h differs by ~sqrt(d) EPS32
    relative (d-term dot products, rounding errors adding up like a random walk), and so does the direction of each
    of the `num_steps - 1` Adam steps (it comes from a float32 gradient); the projection on the clamp ball does not
    amplify them. (num_steps) x sqrt(32) x 1.19e-7: 4.0e-6 for 6 iterations."""
    return num_steps * math.sqrt(D_MODEL) * EPS32


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def max_relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float(((actual - expected).norm(dim=1) / expected.norm(dim=1)).max())


def run(model, tokenizer, requests, z_layer=1, **kwargs):
    settings = dict(SETTINGS, num_steps=6, early_stop_loss=0.05)
    settings.update(kwargs)
    return compute_target_values(model, tokenizer, get_layout(model), requests, TEMPLATES, z_layer, **settings)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gpt_neox", "gemma3_text"])
def test_batched_equals_one_at_a_time(model_type, tokenizer):
    model = build_tiny_causal_lm(model_type, vocab_size=len(tokenizer))
    requests = load_requests(tiny_requests())  # multi-token targets and subjects in the middle of the prompt
    batched = run(model, tokenizer, requests)
    singles = [run(model, tokenizer, [r]) for r in requests]
    assert batched.targets.shape == (4, model.config.hidden_size) and batched.targets.dtype == torch.float32
    assert max_relative(batched.targets, torch.cat([s.targets for s in singles])) <= z_rounding(6)
    assert max_relative(batched.initial, torch.cat([s.initial for s in singles])) <= z_rounding(1)
    for field in ("initial_loss", "final_loss", "final_nll"):
        # A loss is a smooth function of z, computed in the same float32 forward: the same relative rounding.
        expected = torch.cat([getattr(s, field) for s in singles])
        torch.testing.assert_close(getattr(batched, field), expected, rtol=z_rounding(6), atol=0)
    assert torch.equal(batched.steps, torch.cat([s.steps for s in singles]))
    # Chunking is a memory knob only.
    chunked = run(model, tokenizer, requests, batch_size=3)
    assert max_relative(chunked.targets, batched.targets) <= z_rounding(6)
    assert torch.equal(chunked.steps, batched.steps)


def test_initial_matches_keys_module_and_initial_loss_is_the_nll(tokenizer):
    """At step 0 (delta = 0) the loss is the mean over prompts of the mean target-token NLL, from a plain forward."""
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    requests = load_requests(tiny_requests())
    result = run(model, tokenizer, requests, num_steps=1)
    assert result.steps.tolist() == [0, 0, 0, 0]
    _, outputs = compute_keys_and_outputs(model, tokenizer, get_layout(model), requests, TEMPLATES, 1, 1)
    torch.testing.assert_close(result.initial.double(), outputs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.targets, result.initial, rtol=0, atol=0)
    flat = [t for group in TEMPLATES for t in group]
    for i, request in enumerate(requests):
        target = encode_targets(tokenizer, [request.target_new])[0]
        nlls = []
        for template in flat:
            prompt = tokenizer(fill(template, request)[0])["input_ids"]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt + target])).logits[0]
            log_probs = torch.log_softmax(logits[len(prompt) - 1 : len(prompt) - 1 + len(target)], -1)
            nlls.append(-log_probs[torch.arange(len(target)), torch.tensor(target)].mean())
        expected = torch.stack(nlls).mean()
        torch.testing.assert_close(result.initial_loss[i], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(result.final_nll[i], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result.final_loss, result.initial_loss, rtol=0, atol=0)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_optimisation_lowers_the_loss(model_type, tokenizer):
    model = build_tiny_causal_lm(model_type, vocab_size=len(tokenizer))
    result = run(model, tokenizer, load_requests(subject_final_requests()), num_steps=8)
    assert result.steps.tolist() == [7, 7, 7, 7]  # the last iteration takes no step
    assert (result.final_loss < result.initial_loss).all(), (result.initial_loss, result.final_loss)
    assert float((result.initial_loss - result.final_loss).mean()) > 0.2


def loss_trajectories(model, tokenizer, requests, num_steps: int) -> torch.Tensor:
    """`(n, num_steps)`: each request's loss at every iteration of the optimisation without early stopping (the final
    loss of a run of k iterations is the loss at iteration k - 1)."""
    runs = [run(model, tokenizer, requests, num_steps=k, early_stop_loss=0.0) for k in range(1, num_steps + 1)]
    return torch.stack([result.final_loss for result in runs], dim=1)


def splitting_threshold(trajectories: torch.Tensor) -> float:
    """An early-stop threshold under which some requests stop before the last iteration and the others never stop,
    that float32 rounding cannot flip: the midpoint of the widest gap between the requests' lowest losses (among
    thresholds that every request below them reaches before the last iteration), at least the losses' rounding
    (z_rounding, relative) away from every loss."""
    lowest, lowest_early = trajectories.min(dim=1).values, trajectories[:, :-1].min(dim=1).values
    candidates = []
    for low, high in zip(lowest.sort().values, lowest.sort().values[1:]):
        threshold = float(low + high) / 2
        if (lowest_early[lowest < threshold] < threshold).all():
            candidates.append((float(high - low), threshold))
    gap, threshold = max(candidates)
    assert gap / 2 > z_rounding(trajectories.shape[1]) * float(trajectories.max()), gap
    return threshold


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_early_stop(model_type, tokenizer):
    model = build_tiny_causal_lm(model_type, vocab_size=len(tokenizer))
    requests = load_requests(subject_final_requests())
    num_steps = 6
    threshold = splitting_threshold(loss_trajectories(model, tokenizer, requests, num_steps))
    result = run(model, tokenizer, requests, num_steps=num_steps, early_stop_loss=threshold)
    assert (result.steps <= num_steps - 1).all()
    stopped = result.steps < num_steps - 1
    assert stopped.any() and not stopped.all(), result.steps  # the threshold splits the requests
    assert (result.final_loss[stopped] < threshold).all()
    assert (result.final_loss[~stopped] >= threshold).all()
    # A stopped request stopped at the first iteration whose loss fell below the threshold, and its z is the one
    # reached after that many steps: freezing it did not disturb the others.
    for i in stopped.nonzero().squeeze(1).tolist():
        steps = int(result.steps[i])
        capped = run(model, tokenizer, [requests[i]], num_steps=steps + 1, early_stop_loss=0.0)
        assert max_relative(result.targets[i : i + 1], capped.targets) <= z_rounding(steps + 1)
        if steps > 0:
            before = run(model, tokenizer, [requests[i]], num_steps=steps, early_stop_loss=0.0)
            assert before.final_loss[0] >= threshold
    singles = [run(model, tokenizer, [r], num_steps=num_steps, early_stop_loss=threshold) for r in requests]
    assert torch.equal(result.steps, torch.cat([s.steps for s in singles]))
    assert max_relative(result.targets, torch.cat([s.targets for s in singles])) <= z_rounding(num_steps)


def test_target_margins_match_a_loop():
    generator = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(9, 13, generator=generator), -1)
    targets = torch.randint(0, 13, (9,), generator=generator)
    owner = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3])
    expected = torch.full((4,), float("inf"))
    for row in range(9):
        others = torch.cat([logp[row, : targets[row]], logp[row, targets[row] + 1 :]])
        expected[owner[row]] = min(expected[owner[row]], logp[row, targets[row]] - others.max())
    assert torch.equal(target_margins(logp, targets, owner, 4), expected)
    logp[0] = torch.log_softmax(torch.tensor([0.0] * 12 + [9.0]), -1)  # a clear lead of 9 nats
    assert float(target_margins(logp[:1], torch.tensor([12]), torch.tensor([0]), 1)) == pytest.approx(9.0)


def test_stop_rule_counts_patience_from_the_first_lead():
    rule = StopRule(loss=0.05, margin=1.0, patience=2)
    since = torch.full((3,), -1)
    loss = torch.tensor([1.0, 1.0, 0.01])  # the third stops on the loss at once
    assert rule.done(loss, torch.tensor([0.5, 1.5, 0.0]), since, 0).tolist() == [False, False, True]
    assert since.tolist() == [-1, 0, -1]
    assert rule.done(loss, torch.tensor([1.2, 0.2, 0.0]), since, 1).tolist() == [
        False,
        False,
        True,
    ]  # lead lost: still
    assert rule.done(loss, torch.tensor([0.0, 0.0, 0.0]), since, 2).tolist() == [False, True, True]  # counting
    assert rule.done(loss, torch.tensor([0.0, 0.0, 0.0]), since, 3).tolist() == [True, True, True]
    assert StopRule(loss=0.05).done(loss, torch.tensor([9.0, 9.0, 9.0]), since, 0).tolist() == [False, False, True]


def test_margin_stop_ends_each_request_patience_steps_after_its_targets_lead(tokenizer):
    """With the margin rule, each request takes exactly `patience` steps after the first iteration at which its
    target led every prompt by the margin (read off runs without early stopping), and its z is the one reached after
    that many steps."""
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    requests = load_requests(subject_final_requests())
    num_steps, patience = 10, 2
    runs = [run(model, tokenizer, requests, num_steps=k, early_stop_loss=0.0) for k in range(1, num_steps + 1)]
    margins = torch.stack([result.final_margin for result in runs], dim=1)  # (n, iterations)
    values = margins.flatten().sort().values
    gaps = values[1:] - values[:-1]
    middle = slice(len(gaps) // 4, 3 * len(gaps) // 4)  # a threshold that some requests reach early, some late
    k = int(gaps[middle].argmax()) + len(gaps) // 4
    threshold = float(values[k] + values[k + 1]) / 2
    assert float(gaps[k]) / 2 > z_rounding(num_steps) * float(values.abs().max())
    expected = []
    for row in margins:
        leading = (row >= threshold).nonzero()
        expected.append(min(int(leading[0]) + patience, num_steps - 1) if len(leading) else num_steps - 1)
    result = run(
        model,
        tokenizer,
        requests,
        num_steps=num_steps,
        early_stop_loss=0.0,
        early_stop_margin=threshold,
        early_stop_patience=patience,
    )
    assert result.steps.tolist() == expected and min(expected) < num_steps - 1
    for i, steps in enumerate(expected):
        assert max_relative(result.targets[i : i + 1], runs[steps].targets[i : i + 1]) <= z_rounding(steps + 1)


def test_all_requests_stop_immediately(tokenizer):
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    result = run(model, tokenizer, load_requests(subject_final_requests()), early_stop_loss=100.0)
    assert result.steps.tolist() == [0, 0, 0, 0]
    torch.testing.assert_close(result.targets, result.initial, rtol=0, atol=0)


@pytest.mark.parametrize("clamp", [0.05, 0.5])
def test_clamp(clamp, tokenizer):
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    requests = load_requests(subject_final_requests())
    result = run(model, tokenizer, requests, num_steps=6, clamp_norm_factor=clamp)
    shift = (result.targets - result.initial).norm(dim=1)
    bound = clamp * result.initial.norm(dim=1)
    # With lr 0.5 on a tiny model every delta hits the clamp: ||z - h|| = clamp ||h||, up to float32 rounding of
    # three d-term norms (||delta||, ||h||, ||z - h||: d UNIT32 relative each, worst case), of the scale and its
    # product (3 UNIT32), of z = h + delta (UNIT32 |z|) and of z - h (UNIT32 ||z - h||).
    tolerance = (3 * D_MODEL + 4) * UNIT32 * bound + UNIT32 * result.targets.norm(dim=1)
    assert ((shift - bound).abs() <= tolerance).all(), (shift - bound, tolerance)


def test_schedule_shrinks_as_requests_stop(tokenizer):
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    requests = load_requests(subject_final_requests())
    plan = plan_chunks(tokenizer, requests, 2)
    first_requests = [requests[i] for i in plan[0]]
    threshold = splitting_threshold(loss_trajectories(model, tokenizer, first_requests, 6))  # splits the first chunk
    result = run(model, tokenizer, requests, num_steps=6, early_stop_loss=threshold, batch_size=2)
    assert result.chunks == plan and len(result.schedule) == 2  # one schedule per chunk
    steps = [result.steps[members] for members in plan]  # result rows are in request order
    assert [len(chunk) for chunk in result.schedule] == [int(s.max()) + 1 for s in steps]
    first = result.schedule[0]
    assert first[0] == [0, 1] and len(first[-1]) < 2  # some requests of the first chunk stopped
    for earlier, later in zip(first, first[1:]):
        assert set(later) <= set(earlier)
    # The request at position i of a chunk is active at iteration `it` exactly while it <= its steps.
    for chunk_steps, chunk in zip(steps, result.schedule):
        for it, active in enumerate(chunk):
            assert active == [i for i in range(len(chunk[0])) if chunk_steps[i] >= it], (it, active, chunk_steps)


def test_chunks_group_requests_by_suffix_length(tokenizer):
    """The plan orders requests by the number of tokens the blocks after the z layer run (subject-last token to the
    end of prompt + target), so a chunk pads little; the result is in request order whatever the plan."""
    requests = load_requests(tiny_requests() + subject_final_requests())
    lengths = suffix_lengths(tokenizer, requests)
    targets = encode_targets(tokenizer, [r.target_new for r in requests])
    prompts = [fill("{}", r) for r in requests]
    through = [len(ids) for ids in encode_texts(tokenizer, [text for text, _ in prompts])]
    until = [len(ids) for ids in encode_texts(tokenizer, [text[:end] for text, end in prompts])]
    assert lengths == [t - u + 1 + len(g) - 1 for t, u, g in zip(through, until, targets)]  # from the subject-last
    plan = plan_chunks(tokenizer, requests, 3)
    order = [i for members in plan for i in members]
    assert sorted(order) == list(range(len(requests))) and [len(m) for m in plan] == [3, 3, 2]  # 8 in chunks of 3
    assert [lengths[i] for i in order] == sorted(lengths) and len(set(lengths)) > 1
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    chunked = run(model, tokenizer, requests, batch_size=3)
    singles = torch.cat([run(model, tokenizer, [r]).targets for r in requests])
    assert max_relative(chunked.targets, singles) <= z_rounding(6)


def test_chunk_plan_has_the_fewest_chunks_of_even_sizes():
    """A batch runs in `ceil(n / size)` chunks whose sizes differ by at most one (the larger first), every request in
    exactly one, in order: a small remainder never runs as a chunk of its own (16 + 16 + 16 + 2 for 50 requests),
    whose fixed cost (build and every step's forwards) would be paid for one or two requests."""
    assert [len(piece) for piece in balanced_chunks(list(range(50)), 16)] == [13, 13, 12, 12]
    assert [len(piece) for piece in balanced_chunks(list(range(100)), 16)] == [15, 15, 14, 14, 14, 14, 14]
    assert balanced_chunks([], 16) == [] and balanced_chunks([7], 16) == [[7]]
    for n in range(1, 80):
        for size in (1, 2, 3, 5, 16, 32):
            pieces = balanced_chunks(list(range(n)), size)
            lengths = [len(piece) for piece in pieces]
            assert len(pieces) == -(-n // size), (n, size)
            assert max(lengths) <= size and max(lengths) - min(lengths) <= 1, (n, size, lengths)
            assert lengths == sorted(lengths, reverse=True) and sum(pieces, []) == list(range(n))


@pytest.mark.parametrize("model_type", ["gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2", "gemma3_text"])
def test_prefix_cache_is_exact(model_type, tokenizer, caplog):
    """The KV-cache shortcut (only tokens from the subject on are re-run) gives the plain forward's result, and
    passes its own self-check on every tiny architecture (no fallback warning)."""
    model = build_tiny_causal_lm(model_type, vocab_size=len(tokenizer))
    requests = load_requests(tiny_requests())
    with caplog.at_level("WARNING", logger="memit_hf.values"):
        cached = run(model, tokenizer, requests, num_steps=5, use_prefix_cache=True)
    assert not [r for r in caplog.records if "KV-cache shortcut" in r.getMessage()]
    plain = run(model, tokenizer, requests, num_steps=5, use_prefix_cache=False)
    assert max_relative(cached.targets, plain.targets) <= z_rounding(5)
    torch.testing.assert_close(cached.initial_loss, plain.initial_loss, rtol=z_rounding(1), atol=0)
    torch.testing.assert_close(cached.final_loss, plain.final_loss, rtol=z_rounding(5), atol=0)
    assert torch.equal(cached.steps, plain.steps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefix_cache_check_accepts_rounding_and_refuses_a_misplaced_cache(dtype, tokenizer, caplog):
    """The self-check of the KV-cache shortcut accepts the rounding of the model's dtype (a bfloat16 model keeps the
    shortcut) and refuses a cache whose rows belong to other prompts, with a warning naming the error.

    On the tiny GPT-2 with SDPA attention (what a loaded checkpoint runs by default) the cached and plain forwards
    really round differently: by 1.2e-7 in float32 and 3.6e-3 in bfloat16, above float32's tolerance. (With eager
    attention every tiny model computes both bit-identically, which could not tell a bfloat16 bound from a float32
    one.)"""
    model = build_tiny_causal_lm("gpt2", vocab_size=len(tokenizer))
    model.set_attn_implementation("sdpa")
    model = model.to(dtype)
    requests = load_requests(tiny_requests())
    flat = [t for group in TEMPLATES for t in group]
    chunk = ZChunk.build(BlockRunner(model, get_layout(model), 1), tokenizer, requests, flat, use_cache=True)
    error = prefix_cache_error(chunk)
    if dtype == torch.bfloat16:
        assert prefix_cache_tolerance(torch.float32) < error <= prefix_cache_tolerance(torch.bfloat16)
    else:
        assert 0 < error <= z_rounding(1)  # another summation order: float32 rounding of d-term sums
    with caplog.at_level("WARNING", logger="memit_hf.values"):
        assert prefix_cache_matches(chunk)
    assert not caplog.records
    bucket = max(chunk.buckets, key=lambda b: len(b.rows))
    bucket.cache.batch_select_indices(torch.arange(len(bucket.rows)).flip(0))  # rows see another row's prefix
    with caplog.at_level("WARNING", logger="memit_hf.values"):
        assert not prefix_cache_matches(chunk)
    (warning,) = caplog.records
    assert "relative error" in warning.getMessage() and str(dtype) in warning.getMessage()


def test_prefix_cache_tolerance_follows_the_dtype():
    """1e-3 of a row's norm in float32/float64; 8 epsilons in half precision."""
    assert prefix_cache_tolerance(torch.float32) == prefix_cache_tolerance(torch.float64) == 1e-3
    assert prefix_cache_tolerance(torch.bfloat16) == 8 * 2**-7
    assert prefix_cache_tolerance(torch.float16) == 8 * 2**-10


def test_a_chunk_that_runs_out_of_memory_is_split_and_gives_the_same_values(tokenizer, caplog):
    """When an accelerator runs out of memory in a chunk, its halves are optimised one after the other: the same
    targets and steps (requests are independent), the pieces recorded in `chunks`, and a warning."""
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    requests = load_requests(subject_final_requests())
    expected = run(model, tokenizer, requests, batch_size=4)
    # Rows run in length buckets, so no forward of the blocks holds a whole chunk; the LM head's KL logits do: one row
    # per active request (its label logits have at least one row per prompt and request, more than 4 for 2 requests).
    prompts = sum(len(group) for group in TEMPLATES)
    assert 2 * prompts > len(requests) == 4

    def refuse_more_than_two_requests(module, args):
        if 2 < args[0].shape[0] <= len(requests):
            raise torch.cuda.OutOfMemoryError("simulated: the chunk does not fit")

    handle = model.lm_head.register_forward_pre_hook(refuse_more_than_two_requests)
    try:
        with caplog.at_level("WARNING", logger="memit_hf.values"):
            split = run(model, tokenizer, requests, batch_size=4)
    finally:
        handle.remove()
    assert "Out of memory in the z optimisation of 4 requests" in caplog.text
    assert [len(members) for members in split.chunks] == [2, 2] and len(split.schedule) == 2
    assert sorted(i for members in split.chunks for i in members) == [0, 1, 2, 3]
    assert torch.equal(split.steps, expected.steps)
    assert max_relative(split.targets, expected.targets) <= z_rounding(6)


def test_autocast_runs_the_tail_in_low_precision_and_keeps_float32_state(tokenizer):
    """With `autocast_dtype`, blocks after the z layer and the LM head compute in bfloat16 (the losses move by
    bfloat16 rounding) while the delta, the targets and the loss stay float32 and the optimisation takes the same
    path."""
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    requests = load_requests(tiny_requests())
    exact = run(model, tokenizer, requests, early_stop_loss=0.0)
    low = run(model, tokenizer, requests, early_stop_loss=0.0, autocast_dtype=torch.bfloat16)
    assert low.targets.dtype == torch.float32 and low.final_loss.dtype == torch.float32
    assert not torch.equal(low.initial_loss, exact.initial_loss)  # bfloat16 really ran
    # One block and the head after z layer 1: under 8 products in sequence, each rounded to bfloat16 (unit
    # roundoff 2^-8), so the loss at delta = 0 moves by less than 8 * 2^-8 relative.
    torch.testing.assert_close(low.initial_loss, exact.initial_loss, rtol=8 * 2**-8, atol=0)
    torch.testing.assert_close(low.initial, exact.initial, rtol=0, atol=0)  # blocks 0..L stay float32
    # Each Adam step follows the sign of its gradient coordinates, which bfloat16 rarely flips: the same path.
    torch.testing.assert_close(low.final_loss, exact.final_loss, rtol=8 * 2**-8, atol=0)


def test_a_chat_template_row_learns_the_target_without_its_leading_space(tokenizer):
    """Rows whose template opens a new line (a chat answer) are labelled with the target as a chat answer starts it
    (no leading space), the others with the reference's spaced target; the optimisation runs over both."""
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    requests = load_requests(tiny_requests())
    templates = [["{}"], ["I think it will. {}"], ["<s>user: {}\nassistant:\n"]]
    flat = [t for group in templates for t in group]
    rows = ZChunk.build(BlockRunner(model, get_layout(model), 1), tokenizer, requests, flat).rows
    spaced = encode_targets(tokenizer, [r.target_new for r in requests])
    unspaced = encode_targets(tokenizer, [r.target_new for r in requests], leading_space=False)
    assert spaced != unspaced
    for row, labels in enumerate(rows.labels[: len(requests) * len(flat)]):
        request, template = divmod(row, len(flat))
        expected = unspaced[request] if template == 2 else spaced[request]
        assert [token for _, token, _ in labels] == expected
    result = compute_target_values(
        model, tokenizer, get_layout(model), requests, templates, 1, **dict(SETTINGS, num_steps=4)
    )
    assert torch.isfinite(result.targets).all() and (result.final_loss < result.initial_loss).any()


@pytest.mark.parametrize("weight", [1.0, 3.0])
def test_first_token_weight_scales_the_first_target_token(tokenizer, weight):
    """`first_token_weight` weighs each target's first token `weight` times each later token; a prompt's weights
    still sum to 1 / n_prompts (1.0: every token 1 / (len(target) * n_prompts), the reference's mean)."""
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    requests = load_requests(tiny_requests())
    flat = ["{}", "I think it will. {}"]
    rows = ZChunk.build(
        BlockRunner(model, get_layout(model), 1), tokenizer, requests, flat, first_token_weight=weight
    ).rows
    assert any(len(labels) > 1 for labels in rows.labels)  # some target has several tokens
    for labels in rows.labels[: len(requests) * len(flat)]:
        weights = [w for _, _, w in labels]
        assert sum(weights) == pytest.approx(1 / len(flat), rel=1e-12)
        if len(weights) > 1:
            assert weights[0] / weights[1] == pytest.approx(weight, rel=1e-12)
            assert len(set(weights[1:])) == 1
    with pytest.raises(ValueError, match="first_token_weight"):
        compute_target_values(model, tokenizer, get_layout(model), requests, [flat], 1, first_token_weight=0.0)


def test_kl_prompt_is_the_subject_alone_and_shares_the_bare_row_when_it_can(tokenizer):
    """The KL term keeps the next-token distribution after "{subject} is a" (the subject alone, as the reference);
    a request whose prompt opens with the subject needs no KL row of its own: its bare prompt has the same tokens up
    to the subject's last token, so the same logits there (causal attention)."""
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    requests = load_requests(
        [
            {"prompt": "{} is located in", "subject": "the Eiffel Tower", "target_new": "Rome"},
            {"prompt": "{} is a", "subject": "the Eiffel Tower", "target_new": "bridge"},
            {"prompt": "I think {} is", "subject": "the iPhone", "target_new": "Microsoft"},
        ]
    )
    chunk = ZChunk.build(BlockRunner(model, get_layout(model), 1), tokenizer, requests, ["{}"])
    rows = chunk.rows
    assert rows.kl_row[:2] == [0, 1] and rows.is_kl == [False, False, False, True]  # one KL row, for the third
    assert rows.sequences[rows.kl_row[2]] == encode_texts(tokenizer, ["the iPhone is a"])[0]
    delta = torch.randn(3, D_MODEL, generator=torch.Generator().manual_seed(0))
    delta[1] = delta[0]  # the same subject and delta: the first request's KL logits are the second's
    _, kl_hidden = chunk.forward(delta)
    torch.testing.assert_close(kl_hidden[0], kl_hidden[1], rtol=z_rounding(1), atol=0)


def test_keyword_function_equals_the_settings_function(tokenizer):
    """`compute_target_values` builds the `ValueOptimisation` of its keywords and delegates: the same operations, so
    bit-identical results."""
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    requests = load_requests(tiny_requests() + subject_final_requests())
    keywords = run(model, tokenizer, requests, batch_size=3, early_stop_margin=0.5, early_stop_patience=2)
    settings = ValueOptimisation(
        num_steps=6,
        lr=SETTINGS["lr"],
        weight_decay=SETTINGS["weight_decay"],
        clamp_norm_factor=SETTINGS["clamp_norm_factor"],
        kl_factor=SETTINGS["kl_factor"],
        early_stop_loss=0.05,
        early_stop_margin=0.5,
        early_stop_patience=2,
        chunk_size=3,
    )
    layout = get_layout(model)
    result = optimise_target_values(model, tokenizer, layout, requests, TEMPLATES, 1, settings, show_progress=False)
    for name in PER_REQUEST_FIELDS:
        assert torch.equal(getattr(result, name), getattr(keywords, name)), name
    assert result.chunks == keywords.chunks == plan_chunks(tokenizer, requests, 3)
    assert result.schedule == keywords.schedule and result.z_layer == keywords.z_layer == 1


def test_chunks_index_the_one_plan_and_the_whole_run_is_in_request_order(tokenizer):
    """`chunks=` picks chunks of the plan (their requests in the chunks' order); the whole optimisation plans the same
    chunks once and puts every row back in request order, each chunk computed exactly as on its own."""
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    requests = load_requests(tiny_requests() + subject_final_requests())
    plan = plan_chunks(tokenizer, requests, 3)
    assert [i for members in plan for i in members] != list(range(len(requests)))  # the plan reorders
    whole = run(model, tokenizer, requests, batch_size=3)
    assert whole.chunks == plan
    for index in reversed(range(len(plan))):
        part = run(model, tokenizer, requests, batch_size=3, chunks=[index])
        assert part.chunks == [plan[index]]
        for name in PER_REQUEST_FIELDS:
            assert torch.equal(getattr(part, name), getattr(whole, name)[plan[index]]), name
    swapped = run(model, tokenizer, requests, batch_size=3, chunks=[1, 0])
    assert swapped.chunks == [plan[1], plan[0]]
    assert torch.equal(swapped.targets, whole.targets[plan[1] + plan[0]])


def test_chunk_size_defaults_to_the_device_default(tokenizer):
    assert default_chunk_size(torch.device("cpu")) == 16
    assert default_chunk_size(torch.device("cuda")) == default_chunk_size(torch.device("mps")) == 128
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    requests = load_requests(tiny_requests() + subject_final_requests())
    result = run(model, tokenizer, requests, num_steps=2)  # batch_size=None: 16 on this CPU, one chunk
    assert result.chunks == plan_chunks(tokenizer, requests, 16) and len(result.chunks) == 1


@pytest.mark.parametrize(
    "keyword, value, named",
    [
        ("batch_size", 0, "batch_size"),
        ("lr", -1.0, "lr"),
        ("num_steps", 0, "num_steps"),
        ("autocast_dtype", torch.float32, "autocast_dtype"),
    ],
)
def test_bad_keyword_settings_raise_naming_them(tokenizer, keyword, value, named):
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    with pytest.raises(ValueError, match=f"`{named}`"):
        run(model, tokenizer, load_requests(tiny_requests()), **{keyword: value})


def _bucket_cost(buckets, lengths, overhead):
    return sum(len(b) * max(lengths[i] for i in b) + overhead for b in buckets)


@pytest.mark.parametrize("overhead", [0, 3, 8, 1000])
def test_row_buckets_are_the_cheapest_partition_by_length(overhead):
    """`plan_row_buckets` finds the least `sum(rows * longest + overhead)` over every cut of the length-sorted rows
    (checked against all 2^(k-1) cuts), covers every row once, and gives one bucket when forwards cost too much."""
    import itertools
    import random

    generator = random.Random(0)
    for _ in range(20):
        lengths = [generator.choice([3, 4, 5, 6, 12, 13, 20]) for _ in range(generator.randint(1, 9))]
        buckets = plan_row_buckets(lengths, overhead)
        assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
        assert all(b == sorted(b) for b in buckets)
        order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
        best = min(
            _bucket_cost([order[a:b] for a, b in zip((0, *cuts), (*cuts, len(order)))], lengths, overhead)
            for k in range(len(order))
            for cuts in itertools.combinations(range(1, len(order)), k)
        )
        assert _bucket_cost(buckets, lengths, overhead) == best
    assert plan_row_buckets([5, 3, 20, 4], 1000) == [[0, 1, 2, 3]] and plan_row_buckets([], 8) == []
    assert plan_row_buckets([4, 4, 20, 20], 0) == [[0, 1], [2, 3]]
    assert row_bucket_overhead(torch.device("cpu")) == 40 and row_bucket_overhead(torch.device("cuda")) == 256
    # SmolLM2-135M's 3.5M-parameter blocks: 40 tokens; a 0.5B model's 15M: 9; tiny or huge blocks: the bounds.
    assert row_bucket_overhead(torch.device("cpu"), 3_500_000) == 40
    assert row_bucket_overhead(torch.device("cpu"), 15_000_000) == 9
    assert (
        row_bucket_overhead(torch.device("cpu"), 1_000) == 256 and row_bucket_overhead(torch.device("cpu"), 10**9) == 8
    )
    assert row_bucket_overhead(torch.device("cuda"), 3_500_000) == 256


def test_chunk_buckets_part_long_prefixes_and_pad_each_to_its_own():
    """Chat rows (a long system prompt before the subject) and plain rows of the same suffix lengths are planned into
    different buckets when the padded prefix tokens saved outweigh one more forward at every step; each group is then
    cut by suffix length; every row is in exactly one bucket."""
    plain, chat = [3, 5, 4, 2] * 6, [40, 44, 41, 45]
    prefixes = plain + chat
    suffixes = [2, 3, 4, 2] * 6 + [2, 3, 4, 2]
    buckets = plan_chunk_buckets(prefixes, suffixes, overhead=8)
    assert sorted(i for b in buckets for i in b) == list(range(len(prefixes)))
    assert all(b == sorted(b) for b in buckets)
    long_rows = set(range(len(plain), len(prefixes)))
    assert all(set(b) <= long_rows or not set(b) & long_rows for b in buckets)
    # Too few plain rows to pay for another forward at every step: one prefix group, cut by suffix only.
    assert plan_chunk_buckets([3, 40], [2, 2], overhead=8) == [[0, 1]]
    assert plan_chunk_buckets([], [], overhead=8) == []


def test_bucket_prefix_caches_share_the_templates_tokens(tokenizer):
    """The templates' own text runs once ([`TemplatePrefixes`]): every row that opens with it takes its keys and values
    from that cache, and each bucket runs only its rows' own prefix tokens, as wide as the longest of them (a row's
    shared columns hold exactly its template's tokens), also after `select`; the block-L outputs computed in length
    buckets equal one forward over every row at every real position."""
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    requests = load_requests(tiny_requests())
    flat = ["{}", "I think. {}", "<s>system: a long system prompt to pad the prefix with\nuser: {}\nassistant:"]
    runner = BlockRunner(model, get_layout(model), 1)
    chunk = ZChunk.build(runner, tokenizer, requests, flat, bucket_overhead=0)
    prefixes = chunk.prefixes
    assert prefixes.ids[0] == [] and prefixes.cache_row == [-1, 0, 1] and len(prefixes.ids[2]) == prefixes.width
    assert all(chunk.shared[r] == len(prefixes.ids[t]) for r, t in enumerate(chunk.rows.template) if t > 0)
    assert any(bucket.prefix_layout[0] for bucket in chunk.buckets)
    assert prefix_cache_error(chunk) <= z_rounding(1)  # the shared cache reproduces the plain forward
    for piece in (chunk, chunk.select([2, 0])):
        for bucket in piece.buckets:
            shared_width, own_width = bucket.prefix_layout
            assert bucket.batch.prefix_ids.shape[1] == shared_width + own_width and shared_width in (0, prefixes.width)
            members = bucket.rows.tolist()
            shared = [piece.shared[r] if shared_width else 0 for r in members]
            own = [piece.rows.lookup[r] - s for r, s in zip(members, shared)]
            assert own_width >= max(own) and (piece is not chunk or own_width == max(own))
            for k, (r, s) in enumerate(zip(members, shared)):
                columns = bucket.batch.prefix_ids[k, shared_width - s : shared_width].tolist()
                assert columns == (prefixes.ids[piece.rows.template[r]] if s else [])
                assert bucket.batch.prefix_mask[k].sum() == piece.rows.lookup[r]
    # A row that does not open with its template's tokens keeps its whole prefix as its own.
    mismatched = replace(prefixes, ids=[[], [1, 2, 3], prefixes.ids[2]])
    assert all(count == 0 for count, t in zip(mismatched.shared_tokens(chunk.rows), chunk.rows.template) if t == 1)
    full = chunk.batch
    bucketed = block_outputs(runner, full.input_ids, full.attention_mask, overhead=0)
    single = block_outputs(runner, full.input_ids, full.attention_mask, overhead=10**9)
    real = full.attention_mask.bool()
    torch.testing.assert_close(bucketed[real], single[real], rtol=1e-5, atol=1e-6)
    assert torch.equal(bucketed[~real], torch.zeros_like(bucketed[~real]))


def test_bucketed_forward_equals_one_forward(tokenizer):
    """Rows run in length buckets (chat rows much longer than the others) give the same outputs and the same z as
    every row in one forward, to float rounding, also after requests stop (`select` keeps each bucket's rows and
    cache rows)."""
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    requests = load_requests(tiny_requests())
    flat = ["{}", "I think it will. {}", "<s>user: {}\nassistant: a longer turn to pad with\n{}"]
    runner = BlockRunner(model, get_layout(model), 1)
    bucketed = ZChunk.build(runner, tokenizer, requests, flat, bucket_overhead=0)
    single = ZChunk.build(runner, tokenizer, requests, flat, bucket_overhead=10**9)
    assert len(bucketed.buckets) > 1 and len(single.buckets) == 1
    delta = torch.randn(len(requests), D_MODEL, generator=torch.Generator().manual_seed(0))
    for chunk_a, chunk_b in ((bucketed, single), (bucketed.select([2, 0]), single.select([2, 0]))):
        rows = chunk_a.num_requests
        for a, b in zip(chunk_a.forward(delta[:rows]), chunk_b.forward(delta[:rows])):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
