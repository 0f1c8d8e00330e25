"""Tests of `memit_hf.evaluation`: teacher-forced target NLLs and hits (`scoring`), the CounterFact probability
metrics (`counterfact`), the aggregation helpers (`aggregation`), the family registry and `evaluate_model`
(`families`), and `Editor.evaluate`."""

import math
from types import MappingProxyType

import pytest
import torch

from memit_hf.editor import Editor
from memit_hf.evaluation import (
    EVALUATION_METRICS,
    METRIC_FAMILIES,
    METRIC_KEYS,
    ZSRE_METRIC_KEYS,
    counterfact_scores,
    evaluate_counterfact,
    evaluate_model,
    evaluate_zsre,
    harmonic_mean,
    per_case_mean,
    per_case_rate,
    perplexity,
    target_nlls,
    target_token_hits,
)
from memit_hf.evaluation.scoring import LogitsAtPositions
from memit_hf.requests import EditRequest, load_requests
from memit_hf.tokenization import encode_targets, encode_texts
from tests.testing_utils import (
    TINY_MODEL_TYPES,
    OracleLM,
    build_tiny_causal_lm,
    build_tiny_tokenizer,
    next_token_argmax,
    subject_final_requests,
    tiny_corpus,
    tiny_editing_arguments,
)


PROMPTS = [
    "The Eiffel Tower is located in the city of",
    "Big Ben is located in the city of",
    "The iPhone is developed by",
    "I think it will",
    "Lionel Messi plays the sport of",
    "The capital of France is",
    "A quick brown fox jumps over the lazy dog near the old bridge in",
]
TARGETS = ["Paris", "London", "Apple Microsoft", "rain today", "football", "Paris and the capital of Italy", "Madrid"]


def reference_nlls(model, tokenizer, prompts, targets, dtype=torch.float32):
    """Each pair run alone, unpadded, with a full log-softmax over every position."""
    nlls, correct = [], []
    with torch.no_grad():
        for prompt, target in zip(prompts, targets):
            prompt_ids = encode_texts(tokenizer, [prompt])[0]
            target_ids = encode_targets(tokenizer, [target])[0]
            input_ids = torch.tensor([prompt_ids + target_ids])
            log_probs = torch.log_softmax(model(input_ids=input_ids).logits[0].to(dtype), dim=-1)
            token_nlls, token_ok = [], []
            for j, token in enumerate(target_ids):
                position = len(prompt_ids) + j - 1
                token_nlls.append(-log_probs[position, token].item())
                token_ok.append(log_probs[position].argmax().item() == token)
            nlls.append(sum(token_nlls) / len(token_nlls))
            correct.append(all(token_ok))
    return torch.tensor(nlls, dtype=dtype), torch.tensor(correct)


# ----------------------------------------------------------------------------------------------------------------------
# counterfact_scores
# ----------------------------------------------------------------------------------------------------------------------


def _made_up_case():
    """Two cases, prompts interleaved; per-case averages differ from flat ones for PS and NS."""
    rows = [
        # (case, kind, nll_new, nll_true, new_correct, true_correct)
        (10, "rewrite", 1.0, 2.0, True, False),
        (10, "paraphrase", 0.5, 1.0, True, False),
        (3, "rewrite", 2.0, 1.5, False, True),
        (10, "paraphrase", 2.0, 1.0, False, True),
        (10, "neighborhood", 3.0, 1.0, False, True),
        (3, "paraphrase", 0.1, 0.2, True, False),
        (3, "neighborhood", 1.0, 2.0, True, False),
        (3, "neighborhood", 2.0, 1.0, False, True),
        (3, "neighborhood", 0.5, 0.5, False, False),
    ]
    groups = [(case, kind) for case, kind, *_ in rows]
    nll_new = torch.tensor([r[2] for r in rows])
    nll_true = torch.tensor([r[3] for r in rows])
    new_correct = torch.tensor([r[4] for r in rows])
    true_correct = torch.tensor([r[5] for r in rows])
    return nll_new, nll_true, new_correct, true_correct, groups


def test_counterfact_scores_hand_computed():
    scores = counterfact_scores(*_made_up_case())
    assert list(scores) == list(METRIC_KEYS)
    e = math.exp

    # ES: case 10 succeeds, case 3 fails.
    assert scores["efficacy_success"] == pytest.approx(50.0)
    # PS: case 10 has 1/2, case 3 has 1/1 -> (0.5 + 1) / 2 = 75 (a flat average would give 2/3).
    assert scores["paraphrase_success"] == pytest.approx(75.0)
    # NS (nll_true < nll_new): case 10 has 1/1, case 3 has 1/3 (a tie is not a success) -> 2/3 (flat: 1/2).
    assert scores["neighborhood_success"] == pytest.approx(200.0 / 3)

    assert scores["efficacy_magnitude"] == pytest.approx(100 * ((e(-1) - e(-2)) + (e(-2) - e(-1.5))) / 2)
    pm_10 = ((e(-0.5) - e(-1)) + (e(-2) - e(-1))) / 2
    pm_3 = e(-0.1) - e(-0.2)
    assert scores["paraphrase_magnitude"] == pytest.approx(100 * (pm_10 + pm_3) / 2)
    nm_10 = e(-1) - e(-3)
    nm_3 = ((e(-2) - e(-1)) + (e(-1) - e(-2)) + 0.0) / 3
    assert scores["neighborhood_magnitude"] == pytest.approx(100 * (nm_10 + nm_3) / 2)

    # Accuracy: target_new for rewrite/paraphrase, target_true for neighborhood.
    assert scores["efficacy_accuracy"] == pytest.approx(50.0)
    assert scores["paraphrase_accuracy"] == pytest.approx(100 * (0.5 + 1.0) / 2)
    assert scores["neighborhood_accuracy"] == pytest.approx(100 * (1.0 + 1 / 3) / 2)

    expected_score = 3 / (1 / 50 + 1 / 75 + 1 / (200 / 3))
    assert scores["score"] == pytest.approx(expected_score)
    assert scores["score"] == pytest.approx(62.0689655, rel=1e-6)


def test_counterfact_scores_accepts_lists_and_order_does_not_matter():
    nll_new, nll_true, new_correct, true_correct, groups = _made_up_case()
    reference = counterfact_scores(nll_new, nll_true, new_correct, true_correct, groups)
    permutation = [8, 2, 5, 0, 7, 1, 4, 6, 3]
    shuffled = counterfact_scores(
        [nll_new[i].item() for i in permutation],
        [nll_true[i].item() for i in permutation],
        [bool(new_correct[i]) for i in permutation],
        [bool(true_correct[i]) for i in permutation],
        [groups[i] for i in permutation],
    )
    assert shuffled == pytest.approx(reference)


def test_counterfact_scores_zero_component_gives_zero_score():
    groups = [(0, "rewrite"), (0, "paraphrase"), (0, "neighborhood")]
    scores = counterfact_scores([2.0, 0.5, 2.0], [1.0, 1.0, 1.0], [False] * 3, [False] * 3, groups)
    assert scores["efficacy_success"] == 0.0
    assert scores["paraphrase_success"] == 100.0
    assert scores["neighborhood_success"] == 100.0
    assert scores["score"] == 0.0


def test_counterfact_scores_missing_kind_is_nan():
    # Case 1 has no paraphrase: PS averages over case 0 only. No case has a neighborhood prompt: NS and score are NaN.
    groups = [(0, "rewrite"), (0, "paraphrase"), (1, "rewrite")]
    scores = counterfact_scores([0.5, 0.5, 0.5], [1.0, 1.0, 1.0], [True, True, True], [False] * 3, groups)
    assert scores["efficacy_success"] == 100.0
    assert scores["paraphrase_success"] == 100.0
    for key in ("neighborhood_success", "neighborhood_magnitude", "neighborhood_accuracy", "score"):
        assert math.isnan(scores[key]), key


def test_counterfact_scores_validates_inputs():
    with pytest.raises(ValueError, match="same length"):
        counterfact_scores([1.0], [1.0, 2.0], [True], [True], [(0, "rewrite")])
    with pytest.raises(ValueError, match=r"groups\[1\]"):
        counterfact_scores([1.0, 1.0], [1.0, 1.0], [True] * 2, [True] * 2, [(0, "rewrite"), (0, "locality")])


# ----------------------------------------------------------------------------------------------------------------------
# target_nlls
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_target_nlls_matches_per_pair_loop(model_type, tiny_tokenizer):
    model = build_tiny_causal_lm(model_type, vocab_size=len(tiny_tokenizer))
    expected_nll, expected_ok = reference_nlls(model, tiny_tokenizer, PROMPTS, TARGETS)
    for batch_size in (1, 3, 64):
        nll, ok = target_nlls(model, tiny_tokenizer, PROMPTS, TARGETS, batch_size=batch_size)
        assert nll.shape == ok.shape == (len(PROMPTS),)
        assert nll.dtype == torch.float32 and ok.dtype == torch.bool
        torch.testing.assert_close(nll, expected_nll, atol=1e-6, rtol=0)
        assert torch.equal(ok, expected_ok)


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_logits_at_positions_runs_the_head_only_at_the_positions(model_type, tiny_tokenizer):
    """The decoder's hidden states through the head at the chosen positions equal the model's own logits there; after
    the first call's comparison, the head runs only those positions; `target_nlls` keeps the per-pair figures."""
    model = build_tiny_causal_lm(model_type, vocab_size=len(tiny_tokenizer))
    torch.manual_seed(0)
    input_ids = torch.randint(3, len(tiny_tokenizer), (4, 9))
    mask = torch.ones_like(input_ids)
    positions = torch.tensor([[8, 7], [3, 3], [0, 5], [2, 6]])
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits.gather(
            1, positions[..., None].expand(-1, -1, len(tiny_tokenizer))
        )
        logits_at = LogitsAtPositions(model)
        first = logits_at(input_ids, mask, positions)
        assert logits_at.head_only is True
        head_rows = []
        hook = model.get_output_embeddings().register_forward_hook(
            lambda m, args, out: head_rows.append(args[0].shape)
        )
        second = logits_at(input_ids, mask, positions)
        hook.remove()
    torch.testing.assert_close(first, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(second, expected, atol=1e-5, rtol=1e-5)
    assert head_rows == [torch.Size([4, 2, model.config.hidden_size])]  # 8 positions, not 36
    expected_nll, expected_ok = reference_nlls(model, tiny_tokenizer, PROMPTS, TARGETS)
    nll, ok = target_nlls(model, tiny_tokenizer, PROMPTS, TARGETS, batch_size=3)
    torch.testing.assert_close(nll, expected_nll, atol=1e-5, rtol=0)
    assert torch.equal(ok, expected_ok)


def test_logits_at_positions_uses_the_models_logits_when_they_are_not_its_heads(tiny_tokenizer):
    """A model that scales its logits after the head (as Cohere and Granite do) is caught by the first comparison and
    scored from its own logits."""
    model = build_tiny_causal_lm("llama", vocab_size=len(tiny_tokenizer))

    def scale_logits(module, args, output):
        output.logits.mul_(0.25)

    model.register_forward_hook(scale_logits)
    logits_at = LogitsAtPositions(model)
    input_ids = torch.randint(3, len(tiny_tokenizer), (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        picked = logits_at(input_ids, torch.ones_like(input_ids), torch.tensor([[5], [2]]))
        logits = model(input_ids=input_ids).logits
        expected = torch.stack([logits[0, 5], logits[1, 2]])[:, None]
    assert logits_at.head_only is False
    torch.testing.assert_close(picked, expected)
    expected_nll, expected_ok = reference_nlls(model, tiny_tokenizer, PROMPTS, TARGETS)
    nll, ok = target_nlls(model, tiny_tokenizer, PROMPTS, TARGETS, batch_size=3)
    torch.testing.assert_close(nll, expected_nll, atol=1e-6, rtol=0)
    assert torch.equal(ok, expected_ok)


def test_target_nlls_padding_side_independent(tiny_tokenizer, tiny_llama):
    left = build_tiny_tokenizer()
    left.padding_side = "left"
    right_nll, right_ok = target_nlls(tiny_llama, tiny_tokenizer, PROMPTS, TARGETS, batch_size=4)
    left_nll, left_ok = target_nlls(tiny_llama, left, PROMPTS, TARGETS, batch_size=4)
    assert torch.equal(left_nll, right_nll)
    assert torch.equal(left_ok, right_ok)


def test_target_nlls_with_bos_tokenizer(tiny_bos_tokenizer):
    bos = tiny_bos_tokenizer.bos_token_id
    assert encode_texts(tiny_bos_tokenizer, PROMPTS[:1])[0][0] == bos
    assert bos not in encode_targets(tiny_bos_tokenizer, TARGETS)[0]
    model = build_tiny_causal_lm("llama", vocab_size=len(tiny_bos_tokenizer))
    expected_nll, expected_ok = reference_nlls(model, tiny_bos_tokenizer, PROMPTS, TARGETS)
    nll, ok = target_nlls(model, tiny_bos_tokenizer, PROMPTS, TARGETS, batch_size=3)
    torch.testing.assert_close(nll, expected_nll, atol=1e-6, rtol=0)
    assert torch.equal(ok, expected_ok)
    # The BOS changes what the model sees, so the numbers differ from the BOS-free encoding.
    plain = build_tiny_tokenizer()
    assert not torch.allclose(target_nlls(model, plain, PROMPTS, TARGETS)[0], nll)


def test_target_nlls_argmax_and_closed_form(tiny_tokenizer):
    vocab, margin = len(tiny_tokenizer), 5.0
    # Every target token is the argmax: the NLL of each token is log(e^m + V - 1) - m.
    nll, ok = target_nlls(OracleLM(vocab, margin), tiny_tokenizer, PROMPTS, TARGETS, batch_size=2)
    assert ok.all()
    expected = math.log(math.exp(margin) + vocab - 1) - margin
    torch.testing.assert_close(nll, torch.full_like(nll, expected), atol=1e-6, rtol=0)
    # A model that always predicts token 3: no target is all-argmax, every token has NLL log(e^m + V - 1).
    nll, ok = target_nlls(OracleLM(vocab, margin, fixed=3), tiny_tokenizer, PROMPTS, TARGETS, batch_size=2)
    assert not ok.any()
    torch.testing.assert_close(nll, torch.full_like(nll, expected + margin), atol=1e-5, rtol=0)


def test_target_nlls_restores_training_mode_and_validates(tiny_tokenizer, tiny_gpt2):
    tiny_gpt2.train()
    eval_nll, _ = target_nlls(tiny_gpt2.eval(), tiny_tokenizer, PROMPTS[:2], TARGETS[:2])
    tiny_gpt2.train()
    train_nll, _ = target_nlls(tiny_gpt2, tiny_tokenizer, PROMPTS[:2], TARGETS[:2])
    assert tiny_gpt2.training
    assert torch.equal(train_nll, eval_nll)

    empty_nll, empty_ok = target_nlls(tiny_gpt2, tiny_tokenizer, [], [])
    assert empty_nll.shape == empty_ok.shape == (0,)
    with pytest.raises(ValueError, match="same length"):
        target_nlls(tiny_gpt2, tiny_tokenizer, PROMPTS[:2], TARGETS[:1])
    with pytest.raises(ValueError, match="batch_size"):
        target_nlls(tiny_gpt2, tiny_tokenizer, PROMPTS[:1], TARGETS[:1], batch_size=0)
    with pytest.raises(ValueError, match="Pair 0: the prompt"):
        target_nlls(tiny_gpt2, tiny_tokenizer, [""], ["Paris"])


# ----------------------------------------------------------------------------------------------------------------------
# evaluate_counterfact
# ----------------------------------------------------------------------------------------------------------------------


def test_evaluate_counterfact_on_tiny_requests(tiny_tokenizer, tiny_llama, requests_list):
    requests = load_requests(requests_list)
    scores = evaluate_counterfact(tiny_llama, tiny_tokenizer, requests, batch_size=5)
    assert list(scores) == list(METRIC_KEYS)
    for key, value in scores.items():
        assert not math.isnan(value), key
        low = -100.0 if key.endswith("_magnitude") else 0.0
        assert low <= value <= 100.0, (key, value)

    # Same numbers as scoring every prompt by hand and aggregating per case (no request has a `neighborhood_target`:
    # the neighborhood prompts are scored with `target_true`).
    rows = []  # (prompt, target_new, target_true, (case, kind))
    for case, request in enumerate(requests):
        rows.append((request.text, request.target_new, request.target_true, (case, "rewrite")))
        for prompt in request.paraphrase_prompts:
            rows.append((prompt, request.target_new, request.target_true, (case, "paraphrase")))
        for prompt in request.neighborhood_prompts:
            rows.append((prompt, request.target_new, request.target_true, (case, "neighborhood")))
    prompts, news, trues, groups = map(list, zip(*rows))
    nll_new, ok_new = reference_nlls(tiny_llama, tiny_tokenizer, prompts, news)
    nll_true, ok_true = reference_nlls(tiny_llama, tiny_tokenizer, prompts, trues)
    expected = counterfact_scores(nll_new, nll_true, ok_new, ok_true, groups)
    assert scores == pytest.approx(expected, abs=1e-4)


def test_evaluate_counterfact_uses_neighborhood_target(tiny_tokenizer, tiny_llama):
    request = EditRequest(
        prompt="{} is developed by",
        subject="The iPhone",
        target_new="Microsoft",
        target_true="Apple",
        paraphrase_prompts=["I think The iPhone is developed by"],
        neighborhood_prompts=["Windows is developed by"],
        neighborhood_target="Google",
    )
    scores = evaluate_counterfact(tiny_llama, tiny_tokenizer, [request])
    # By hand: `target_new` against `target_true` after the rewrite and paraphrase prompts, against the neighborhood
    # target after the neighborhood prompt, each pair scored alone.
    prompts = ["The iPhone is developed by", "I think The iPhone is developed by", "Windows is developed by"]
    groups = [(0, "rewrite"), (0, "paraphrase"), (0, "neighborhood")]
    nll_new, ok_new = reference_nlls(tiny_llama, tiny_tokenizer, prompts, ["Microsoft"] * 3)
    nll_true, ok_true = reference_nlls(tiny_llama, tiny_tokenizer, prompts, ["Apple", "Apple", "Google"])
    expected = counterfact_scores(nll_new, nll_true, ok_new, ok_true, groups)
    assert scores == pytest.approx(expected, abs=1e-5)
    # Scoring the neighborhood prompt with `target_true` instead would give another neighborhood magnitude.
    nll_apple, ok_apple = reference_nlls(tiny_llama, tiny_tokenizer, prompts[2:], ["Apple"])
    fallback = counterfact_scores(
        nll_new, torch.cat([nll_true[:2], nll_apple]), ok_new, torch.cat([ok_true[:2], ok_apple]), groups
    )
    assert abs(fallback["neighborhood_magnitude"] - scores["neighborhood_magnitude"]) > 1e-3


def test_evaluate_counterfact_without_paraphrases_or_neighbors(tiny_tokenizer, tiny_gpt2):
    prompt = "Big Ben is located in the city of"
    requests = [
        EditRequest(prompt="{} is located in the city of", subject="Big Ben", target_new="Rome", target_true="London")
    ]
    scores = evaluate_counterfact(tiny_gpt2, tiny_tokenizer, requests)
    # By hand, from the rewrite prompt alone: ES is 100 when ` Rome` is likelier than ` London`, else 0.
    (nll_new,), (ok_new,) = reference_nlls(tiny_gpt2, tiny_tokenizer, [prompt], ["Rome"])
    (nll_true,), _ = reference_nlls(tiny_gpt2, tiny_tokenizer, [prompt], ["London"])
    assert abs(nll_new - nll_true) > 1e-3  # far from a tie, so the success is not decided by rounding
    assert scores["efficacy_success"] == (100.0 if nll_new < nll_true else 0.0)
    assert scores["efficacy_magnitude"] == pytest.approx(100 * (math.exp(-nll_new) - math.exp(-nll_true)), abs=1e-5)
    assert scores["efficacy_accuracy"] == (100.0 if ok_new else 0.0)
    assert math.isnan(scores["paraphrase_success"]) and math.isnan(scores["neighborhood_success"])
    assert math.isnan(scores["score"])


def test_evaluate_counterfact_requires_target_true(tiny_tokenizer, tiny_gpt2, requests_list):
    requests = load_requests(requests_list)
    requests[2].target_true = None
    requests[2].record_index = 7
    with pytest.raises(ValueError, match=r"Request 7: field `target_true`"):
        evaluate_counterfact(tiny_gpt2, tiny_tokenizer, requests)
    with pytest.raises(ValueError, match="at least one request"):
        evaluate_counterfact(tiny_gpt2, tiny_tokenizer, [])


# ----------------------------------------------------------------------------------------------------------------------
# float64 models, per-token hits
# ----------------------------------------------------------------------------------------------------------------------


def test_target_nlls_keeps_float64_for_a_float64_model(tiny_tokenizer):
    model = build_tiny_causal_lm("llama", vocab_size=len(tiny_tokenizer)).double()
    expected_nll, expected_ok = reference_nlls(model, tiny_tokenizer, PROMPTS, TARGETS, dtype=torch.float64)
    nll, ok = target_nlls(model, tiny_tokenizer, PROMPTS, TARGETS, batch_size=3)
    assert nll.dtype == torch.float64
    torch.testing.assert_close(nll, expected_nll, atol=1e-12, rtol=0)
    assert torch.equal(ok, expected_ok)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_target_token_hits_match_a_per_token_loop(model_type, tiny_tokenizer):
    model = build_tiny_causal_lm(model_type, vocab_size=len(tiny_tokenizer))
    hits = target_token_hits(model, tiny_tokenizer, PROMPTS, TARGETS, batch_size=3)
    assert len(hits) == len(PROMPTS)
    with torch.no_grad():
        for prompt, target, got in zip(PROMPTS, TARGETS, hits):
            prompt_ids = encode_texts(tiny_tokenizer, [prompt])[0]
            target_ids = encode_targets(tiny_tokenizer, [target])[0]
            expected = []
            for i, token in enumerate(target_ids):  # the reference: one sequence per target token
                logits = model(input_ids=torch.tensor([prompt_ids + target_ids[:i]])).logits[0, -1]
                expected.append(int(logits.argmax()) == token)
            assert got.dtype == torch.bool and got.tolist() == expected
    _, all_ok = target_nlls(model, tiny_tokenizer, PROMPTS, TARGETS)
    assert [bool(h.all()) for h in hits] == all_ok.tolist()


def test_target_token_hits_closed_form(tiny_tokenizer):
    # An LM that always predicts one token hits exactly the target tokens equal to it.
    rome = encode_targets(tiny_tokenizer, ["Rome"])[0]
    assert len(rome) == 1
    targets = ["Rome", "Rome Rome", "Paris", "Paris Rome"]
    hits = target_token_hits(OracleLM(len(tiny_tokenizer), fixed=rome[0]), tiny_tokenizer, PROMPTS[:4], targets)
    expected = [[token == rome[0] for token in ids] for ids in encode_targets(tiny_tokenizer, targets)]
    assert [h.tolist() for h in hits] == expected
    assert expected[0] == [True] and expected[2] == [False] * len(expected[2])
    with pytest.raises(ValueError, match="same length"):
        target_token_hits(OracleLM(10), tiny_tokenizer, PROMPTS[:2], TARGETS[:1])


# ----------------------------------------------------------------------------------------------------------------------
# aggregation helpers
# ----------------------------------------------------------------------------------------------------------------------


def test_per_case_mean_weighs_cases_equally():
    # case "a": (1 + 0 + 0) / 3, case 7: 1, case "b": 0.5 -> (1/3 + 1 + 0.5) / 3
    assert per_case_mean([1.0, 0.0, 1.0, 0.0, 0.5], ["a", "a", 7, "a", "b"]) == pytest.approx((1 / 3 + 1 + 0.5) / 3)
    assert per_case_mean(torch.tensor([2.0, 4.0]), [0, 0]) == pytest.approx(3.0)
    assert math.isnan(per_case_mean([], []))
    with pytest.raises(ValueError, match="same length"):
        per_case_mean([1.0], [0, 1])


def test_per_case_rate_is_the_per_case_share_in_percent():
    # case 0: 1 of 2, case 1: 1 of 1 -> (50 + 100) / 2
    assert per_case_rate(iter([True, False, True]), [0, 0, 1]) == pytest.approx(75.0)
    assert math.isnan(per_case_rate([], []))


def test_harmonic_mean():
    assert harmonic_mean([50.0, 75.0, 200.0 / 3]) == pytest.approx(62.0689655, rel=1e-6)
    assert harmonic_mean([40.0, 40.0]) == pytest.approx(40.0)
    assert harmonic_mean([0.0, 90.0]) == 0.0
    assert math.isnan(harmonic_mean([math.nan, 90.0])) and math.isnan(harmonic_mean([]))


# ----------------------------------------------------------------------------------------------------------------------
# evaluate_model and Editor.evaluate
# ----------------------------------------------------------------------------------------------------------------------


def test_evaluate_model_merges_the_families(tiny_tokenizer, tiny_llama, requests_list):
    requests = load_requests(requests_list)
    results = evaluate_model(
        tiny_llama, tiny_tokenizer, requests, metrics=["counterfact", "zsre"], perplexity_texts=tiny_corpus()[:4]
    )
    assert list(results) == [*METRIC_KEYS, *ZSRE_METRIC_KEYS, "perplexity"]
    assert results == pytest.approx(
        {
            **evaluate_counterfact(tiny_llama, tiny_tokenizer, requests),
            **evaluate_zsre(tiny_llama, tiny_tokenizer, requests),
            "perplexity": perplexity(tiny_llama, tiny_tokenizer, tiny_corpus()[:4]),
        },
        nan_ok=True,
    )
    assert EVALUATION_METRICS == ("counterfact", "zsre", "generation", "generative", "wild", "multihop", "perplexity")
    with pytest.raises(ValueError, match="Unknown metrics"):
        evaluate_model(tiny_llama, tiny_tokenizer, requests, metrics=["bleu"])
    with pytest.raises(ValueError, match="perplexity_texts"):
        evaluate_model(tiny_llama, tiny_tokenizer, requests, metrics=["perplexity"])


def test_metric_families_are_a_read_only_registry():
    assert isinstance(METRIC_FAMILIES, MappingProxyType)
    assert tuple(METRIC_FAMILIES) == EVALUATION_METRICS
    with pytest.raises(TypeError):
        METRIC_FAMILIES["bleu"] = evaluate_counterfact


def test_evaluate_model_runs_families_in_registry_order(tiny_tokenizer, tiny_gpt2, requests_list):
    requests = load_requests(requests_list)
    results = evaluate_model(tiny_gpt2, tiny_tokenizer, requests, metrics=["zsre", "counterfact", "zsre"])
    assert list(results) == [*METRIC_KEYS, *ZSRE_METRIC_KEYS]
    assert results == pytest.approx(
        {
            **evaluate_counterfact(tiny_gpt2, tiny_tokenizer, requests),
            **evaluate_zsre(tiny_gpt2, tiny_tokenizer, requests),
        },
        nan_ok=True,
    )
    assert evaluate_model(tiny_gpt2, tiny_tokenizer, requests, metrics="zsre") == pytest.approx(
        evaluate_zsre(tiny_gpt2, tiny_tokenizer, requests), nan_ok=True
    )


def test_editor_evaluate_reports_pre_figures_of_every_family(tiny_tokenizer, tmp_path):
    model = build_tiny_causal_lm("llama", vocab_size=len(tiny_tokenizer))
    requests = [
        dict(r, paraphrase_prompts=["I think " + r["prompt"].format(r["subject"])]) for r in subject_final_requests()
    ]
    editor = Editor(
        model, args=tiny_editing_arguments(tmp_path), processing_class=tiny_tokenizer, stats_dataset=tiny_corpus()
    )
    kwargs = dict(metrics=["counterfact", "zsre", "generation"], perplexity_texts=tiny_corpus()[:6])
    before = editor.evaluate(requests, **kwargs)
    assert not any(key.startswith("pre_") for key in before)  # nothing edited yet
    assert {"efficacy_success", "zsre_efficacy_accuracy", "generation_entropy", "perplexity"} <= set(before)

    editor.edit(requests)
    after = editor.evaluate(requests, **kwargs)
    assert set(after) == set(before) | {f"pre_{key}" for key in before}
    # The pre_ figures are the unedited model's, computed with the same seed.
    assert {key: after[f"pre_{key}"] for key in before} == pytest.approx(before, nan_ok=True)
    # The edit makes the first token of every new target the argmax after its rewrite prompt (subject-final prompts
    # on a tiny model): the token-level figures rise from 0 to what the per-token hits of the edited model give
    # (CounterFact accuracy: all tokens of a target hit; zsRE accuracy: the fraction of its tokens that hit).
    assert before["efficacy_accuracy"] == before["zsre_efficacy_accuracy"] == 0.0
    prompts = [r["prompt"].format(r["subject"]) for r in requests]
    targets = [r["target_new"] for r in requests]
    assert next_token_argmax(model, tiny_tokenizer, prompts) == [
        ids[0] for ids in encode_targets(tiny_tokenizer, targets)
    ]
    hits = target_token_hits(model, tiny_tokenizer, prompts, targets)
    assert after["efficacy_accuracy"] == pytest.approx(100 * sum(bool(h.all()) for h in hits) / len(hits))
    assert after["zsre_efficacy_accuracy"] == pytest.approx(
        100 * sum(float(h.double().mean()) for h in hits) / len(hits)
    )
    assert after["zsre_efficacy_accuracy"] > after["efficacy_accuracy"] > 0.0  # some targets have several tokens
    assert after["efficacy_magnitude"] > before["efficacy_magnitude"]
    assert after["perplexity"] != before["perplexity"]
    assert not any(key.startswith("pre_") for key in editor.evaluate(requests, include_pre=False))
