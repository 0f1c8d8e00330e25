"""Tests of `memit_hf.evaluation.zsre`: zsRE token-level teacher-forced accuracy."""

import math

import pytest
import torch
from torch import nn

from memit_hf.evaluation.scoring import target_token_hits
from memit_hf.evaluation.zsre import ZSRE_METRIC_KEYS, evaluate_zsre, zsre_scores
from memit_hf.requests import EditRequest, load_requests
from memit_hf.tokenization import encode_targets, encode_texts
from tests.testing_utils import OracleLM


ZSRE_RECORD = {
    "subject": "Ramalinaceae",
    "src": "Which family does Ramalinaceae belong to?",
    "rephrase": "What family are Ramalinaceae?",
    "alt": "Lamiinae",
    "answers": ["Lecanorales"],
    "loc": "nq question: types of skiing in the winter olympics 2018",
    "loc_ans": "Downhill",
}


def test_zsre_scores_hand_computed():
    token_hits = [
        [True, False, True, True],  # case 0 rewrite: 3/4
        [False, False],  # case 0 paraphrase: 0/2 ...
        [True, True, True, True, True, True],  # ... with another paraphrase: case 0 has 6/8
        [True, False],  # case 0 neighborhood: 1/2
        torch.tensor([False]),  # case "b" rewrite: 0/1
        [True],  # case "b" paraphrase: 1/1
    ]
    groups = [(0, "rewrite"), (0, "paraphrase"), (0, "paraphrase"), (0, "neighborhood"), ("b", "rewrite")]
    groups.append(("b", "paraphrase"))
    scores = zsre_scores(token_hits, groups)
    assert list(scores) == list(ZSRE_METRIC_KEYS)
    assert scores["zsre_efficacy_accuracy"] == pytest.approx(100 * (3 / 4 + 0) / 2)
    # tokens, not prompts, are averaged within a case: (6/8 + 1) / 2, not ((0 + 1) / 2 + 1) / 2
    assert scores["zsre_paraphrase_accuracy"] == pytest.approx(100 * (6 / 8 + 1) / 2)
    assert scores["zsre_neighborhood_accuracy"] == pytest.approx(50.0)  # only case 0 has a neighborhood prompt
    assert scores["zsre_score"] == pytest.approx(3 / (1 / 37.5 + 1 / 87.5 + 1 / 50))


def test_zsre_scores_missing_kind_and_validation():
    scores = zsre_scores([[True], [False]], [(0, "rewrite"), (0, "paraphrase")])
    assert scores["zsre_efficacy_accuracy"] == 100.0 and scores["zsre_paraphrase_accuracy"] == 0.0
    assert math.isnan(scores["zsre_neighborhood_accuracy"]) and math.isnan(scores["zsre_score"])
    with pytest.raises(ValueError, match="same length"):
        zsre_scores([[True]], [])
    with pytest.raises(ValueError, match=r"groups\[0\]"):
        zsre_scores([[True]], [(0, "locality")])


class SuccessorLM(nn.Module):
    """A fake causal LM that puts `margin` on `successors[token]` after each input token (on token 0 elsewhere)."""

    def __init__(self, vocab_size: int, successors: dict[int, int], margin: float = 5.0):
        super().__init__()
        lookup = torch.zeros(vocab_size, dtype=torch.long)
        for token, successor in successors.items():
            lookup[token] = successor
        self.register_buffer("lookup", lookup)
        self.margin = margin
        self.anchor = nn.Parameter(torch.zeros(1))

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def forward(self, input_ids, attention_mask=None):
        logits = nn.functional.one_hot(self.lookup[input_ids], len(self.lookup)).float() * self.margin
        return type("Output", (), {"logits": logits})()


def test_evaluate_zsre_pairs_and_question_mark(tiny_tokenizer):
    (request,) = load_requests([ZSRE_RECORD])
    # An LM that has learnt `? Downhill` and `Lamiinae` token by token: it hits every token of ` Downhill` after a
    # question mark, all but the first after anything else, and some tokens of ` Lamiinae` (none of ` Lecanorales`).
    downhill, lamiinae = encode_targets(tiny_tokenizer, ["Downhill", "Lamiinae"])
    question_mark = tiny_tokenizer.convert_tokens_to_ids("?")
    chain = [question_mark, *downhill]
    successors = dict(zip(chain, chain[1:])) | dict(zip(lamiinae, lamiinae[1:]))
    assert len(successors) == len(chain) - 1 + len(set(lamiinae[:-1]))  # the two chains share no token
    model = SuccessorLM(len(tiny_tokenizer), successors)

    # The expected pairs, by hand: `target_new` after the question and its rephrasing, `loc_ans` after `loc + "?"`
    # (as the reference scores it).
    prompts = [
        "Which family does Ramalinaceae belong to?",
        "What family are Ramalinaceae?",
        "nq question: types of skiing in the winter olympics 2018?",
    ]
    groups = [(0, "rewrite"), (0, "paraphrase"), (0, "neighborhood")]
    hits = target_token_hits(model, tiny_tokenizer, prompts, ["Lamiinae", "Lamiinae", "Downhill"])
    expected = zsre_scores(hits, groups)
    assert 0 < expected["zsre_efficacy_accuracy"] < 100  # the rewrite is scored with `target_new`, not the answer
    assert expected["zsre_neighborhood_accuracy"] == 100.0
    assert evaluate_zsre(model, tiny_tokenizer, [request]) == expected

    # Without the suffix the neighborhood question ends with "2018": the first token of ` Downhill` is missed.
    without_suffix = evaluate_zsre(model, tiny_tokenizer, [request], neighborhood_suffix="")
    assert without_suffix["zsre_neighborhood_accuracy"] == pytest.approx(100 * (len(downhill) - 1) / len(downhill))
    assert without_suffix["zsre_efficacy_accuracy"] == expected["zsre_efficacy_accuracy"]


def test_evaluate_zsre_closed_form(tiny_tokenizer):
    # An oracle that predicts the next input token hits every target token; one that always predicts the first token
    # of " Rome" hits exactly the target tokens equal to it.
    requests = [
        EditRequest(
            prompt="{} is in", subject="Big Ben", target_new="Rome", paraphrase_prompts=["I think Big Ben is in"]
        ),
        EditRequest(
            prompt="The capital of {} is",
            subject="France",
            target_new="Paris and Rome",
            neighborhood_prompts=["The capital of Italy is"],
            neighborhood_target="Rome",
        ),
    ]
    perfect = evaluate_zsre(OracleLM(len(tiny_tokenizer)), tiny_tokenizer, requests)
    assert perfect == pytest.approx(dict.fromkeys(ZSRE_METRIC_KEYS, 100.0))

    rome = encode_targets(tiny_tokenizer, ["Rome"])[0]
    assert len(rome) == 1
    second = encode_targets(tiny_tokenizer, ["Paris and Rome"])[0]
    share = sum(token == rome[0] for token in second) / len(second)
    assert 0 < share < 1
    scores = evaluate_zsre(OracleLM(len(tiny_tokenizer), fixed=rome[0]), tiny_tokenizer, requests)
    assert scores["zsre_efficacy_accuracy"] == pytest.approx(100 * (1.0 + share) / 2)
    assert scores["zsre_paraphrase_accuracy"] == pytest.approx(100.0)  # only request 0 has a paraphrase
    assert scores["zsre_neighborhood_accuracy"] == pytest.approx(100.0)


def test_evaluate_zsre_matches_a_per_token_loop(tiny_tokenizer, tiny_gpt2, requests_list):
    requests = load_requests(requests_list)
    for request in requests:
        request.neighborhood_target = "Rome"
    scores = evaluate_zsre(tiny_gpt2, tiny_tokenizer, requests, batch_size=3)
    hits, groups = [], []
    with torch.no_grad():
        for case, request in enumerate(requests):
            pairs = [(request.text, request.target_new, "rewrite")]
            pairs += [(p, request.target_new, "paraphrase") for p in request.paraphrase_prompts]
            pairs += [(p + "?", "Rome", "neighborhood") for p in request.neighborhood_prompts]
            for prompt, target, kind in pairs:
                prompt_ids = encode_texts(tiny_tokenizer, [prompt])[0]
                target_ids = encode_targets(tiny_tokenizer, [target])[0]
                row = []
                for i, token in enumerate(target_ids):
                    logits = tiny_gpt2(input_ids=torch.tensor([prompt_ids + target_ids[:i]])).logits[0, -1]
                    row.append(int(logits.argmax()) == token)
                hits.append(row)
                groups.append((case, kind))
    assert scores == pytest.approx(zsre_scores(hits, groups))
    with pytest.raises(ValueError, match="at least one request"):
        evaluate_zsre(tiny_gpt2, tiny_tokenizer, [])
