"""Tests of `memit_hf.evaluation.multihop`: MQuAKE cases, teacher-forced and generative multi-hop accuracy on a
scripted model whose answers are known."""

import logging
import math

import pytest

from memit_hf.evaluation import MULTIHOP_METRIC_KEYS, evaluate_model, evaluate_multihop, multihop_cases
from memit_hf.requests import MultiHopQuestions, load_requests
from tests.testing_utils import build_tiny_chat_tokenizer, build_tiny_tokenizer, scripted_lm


def _rewrite(subject: str, prompt: str, new: str, true: str) -> dict:
    return {"prompt": prompt, "subject": subject, "target_new": {"str": new}, "target_true": {"str": true}}


CASE_A = {  # MQuAKE shape: two single-hop edits, three questions
    "case_id": 1,
    "requested_rewrite": [
        _rewrite("The Eiffel Tower", "{} is located next to", "Big Ben", "the Louvre"),
        _rewrite("Big Ben", "{} is located in the city of", "Rome", "London"),
    ],
    "questions": ["QA1?", "QA2?", "QA3?"],
    "new_answer": "Rome",
    "new_answer_alias": ["the city of Rome"],
    "answer": "Paris",
    "answer_alias": ["the window"],
}
CASE_B = {
    "case_id": 2,
    "requested_rewrite": [_rewrite("The iPhone", "{} is developed by", "Microsoft", "Apple")],
    "questions": ["QB1?", "QB2?"],
    "new_answer": "football",
    "answer": "basketball",
}
CASE_C = {  # canonical shape, no old answer: left out of the teacher-forced and old-answer figures
    "prompt": "The capital of {} is",
    "subject": "France",
    "target_new": "Rome",
    "multi_hop": {"questions": ["QC1?"], "new_answer": "Rome"},
}
PLAIN = {  # the answer after "Q: {question} A:"
    "Q: QA1? A:": " Rome\nQ: Or Paris?",  # new answer; the old one only after the line break
    "Q: QA2? A:": " the window",  # an alias of the old answer
    "Q: QA3? A:": " the city of Rome",  # an alias of the new answer
    "Q: QB1? A:": " basketball",  # the old answer
    "Q: QB2? A:": " football, of course",  # the new answer
    "Q: QC1? A:": " I do not know",
}
CHAT = {"QA1?": "The answer is Rome.", "QB1?": "basketball."}

# Per question (teacher-forced main / alias, greedy new / old), then per case, then across cases, times 100.
# Main: the new and old answers are single tokens, so when neither is scripted their NLLs tie exactly (no success).
EXPECTED = {
    "multihop_success": 100 * (1 / 3 + 1 / 2) / 2,  # A: QA1; B: QB2
    "multihop_alias_success": 100 * (2 / 3 + 1 / 2) / 2,  # A: QA1, QA3; B: QB2
    "multihop_case_success": 100.0,  # A and B each have one
    "gen_multihop_accuracy": 100 * (2 / 3 + 1 / 2 + 0) / 3,  # A: QA1, QA3; B: QB2; C: none
    "gen_multihop_case_accuracy": 100 * 2 / 3,
    "gen_multihop_old_answer": 100 * (1 / 3 + 1 / 2) / 2,  # A: QA2 (alias); B: QB1
    "chat_multihop_accuracy": 100 * (1 / 3 + 0 + 0) / 3,
    "chat_multihop_case_accuracy": 100 / 3,
    "chat_multihop_old_answer": 100 * (0 + 1 / 2) / 2,
}


def _requests():
    unrelated = {"prompt": "{} plays", "subject": "Lionel Messi", "target_new": "basketball"}
    return load_requests([CASE_A, unrelated, CASE_B, CASE_C])


def test_multihop_cases_are_deduplicated_in_order():
    requests = _requests()
    assert len(requests) == 5  # two edits of case A, the unrelated edit, B, C
    cases = multihop_cases(requests)
    assert [case.questions for case in cases] == [["QA1?", "QA2?", "QA3?"], ["QB1?", "QB2?"], ["QC1?"]]
    assert cases[2] == MultiHopQuestions(questions=["QC1?"], new_answer="Rome")
    assert multihop_cases(requests[2:3]) == []


def test_multihop_metrics_on_hand_built_answers():
    tokenizer = build_tiny_chat_tokenizer()
    for answer in ("Rome", "Paris", "football", "basketball"):  # the exact-tie argument above needs single tokens
        assert len(tokenizer(" " + answer, add_special_tokens=False)["input_ids"]) == 1, answer
    model = scripted_lm(tokenizer, PLAIN, CHAT)
    results = evaluate_multihop(model, tokenizer, _requests(), batch_size=4)
    assert list(results) == list(MULTIHOP_METRIC_KEYS)
    assert results == pytest.approx(EXPECTED)
    assert evaluate_model(model, tokenizer, _requests(), metrics="multihop", batch_size=4) == pytest.approx(EXPECTED)


def test_question_template():
    tokenizer = build_tiny_tokenizer()
    model = scripted_lm(tokenizer, {"Question: QB2? Answer:": " football"})
    requests = load_requests([CASE_B])
    results = evaluate_multihop(model, tokenizer, requests, question_template="Question: {question} Answer:")
    assert results["gen_multihop_accuracy"] == results["multihop_success"] == 50.0
    with pytest.raises(ValueError, match="`\\{question\\}` field"):
        evaluate_multihop(model, tokenizer, requests, question_template="Q: A:")


def test_chat_figures_are_nan_without_a_chat_template(caplog):
    tokenizer = build_tiny_tokenizer()
    model = scripted_lm(tokenizer, PLAIN)
    with caplog.at_level(logging.WARNING, logger="memit_hf.evaluation.multihop"):
        results = evaluate_multihop(model, tokenizer, _requests())
    assert "no chat template" in caplog.text
    for key in MULTIHOP_METRIC_KEYS:
        if key.startswith("chat_"):
            assert math.isnan(results[key]), key
        else:
            assert results[key] == pytest.approx(EXPECTED[key]), key
    with pytest.raises(ValueError, match="chat template"):
        evaluate_multihop(model, tokenizer, _requests(), chat=True)


def test_cases_without_an_old_answer_and_without_questions():
    tokenizer = build_tiny_tokenizer()
    model = scripted_lm(tokenizer, {"Q: QC1? A:": " Rome"})
    results = evaluate_multihop(model, tokenizer, load_requests([CASE_C]), chat=False)
    assert results["gen_multihop_accuracy"] == results["gen_multihop_case_accuracy"] == 100.0
    for key in ("multihop_success", "multihop_alias_success", "multihop_case_success", "gen_multihop_old_answer"):
        assert math.isnan(results[key]), key
    with pytest.raises(ValueError, match="No request carries multi-hop questions"):
        evaluate_multihop(model, tokenizer, load_requests([{"prompt": "{} is", "subject": "x", "target_new": "y"}]))
