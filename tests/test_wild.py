"""Tests of `memit_hf.evaluation.wild` (free answers to questions in a task context, after the WILD protocol of "The
Mirage of Model Editing") and of the relation question table `memit_hf.questions`: answer cutting and matching on
fixed strings, the metrics on a scripted model whose answers are known, the unedited reference, the chat and plain
forms, and a tiny random model scored against its own answers."""

import contextlib
import math
from types import MappingProxyType

import pytest

from memit_hf.evaluation import (
    WILD_CONTEXT,
    WILD_METRIC_KEYS,
    answer_position,
    contains_answer,
    cut_answer,
    evaluate_model,
    evaluate_wild,
    exact_match,
    greedy_continuations,
)
from memit_hf.questions import (
    RELATION_CLOZE_TEMPLATES,
    RELATION_QUESTIONS,
    cloze_subject,
    neighbor_questions,
    questions_for,
)
from memit_hf.requests import load_requests
from tests.testing_utils import (
    build_tiny_causal_lm,
    build_tiny_chat_tokenizer,
    build_tiny_tokenizer,
    scripted_lm,
    scripts,
)


# ----------------------------------------------------------------------------- answers


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        (" Rome. It is the capital of Italy.", "Rome"),
        (" Rome\nQ: Where is Paris?", "Rome"),
        (" Rome.", "Rome"),
        (" Rome", "Rome"),
        (" the U.S. Army", "the U.S"),  # a "." followed by a space ends the sentence
        (" U.S.A", "U.S.A"),  # dots inside a word do not
        (" 3.5 million people. Many more", "3.5 million people"),
        (" It is Rome.\tTabs count as whitespace", "It is Rome"),
        ("\nRome", ""),  # a leading line break ends the answer at once
        ("", ""),
    ],
)
def test_cut_answer(text, answer):
    assert cut_answer(text) == answer


def test_exact_contains_and_position_on_fixed_strings():
    assert exact_match("Rome", "Rome") and exact_match(" the ROME.", "Rome") and exact_match("Rome", "the Rome")
    assert exact_match("United Kingdom of the Great Britain", "the United Kingdom of Great Britain")  # every article
    assert exact_match("Côte d'Ivoire", "cote d ivoire")
    assert not exact_match("It is Rome", "Rome") and not exact_match("Romeo", "Rome")
    assert not exact_match("", "?") and not exact_match("the", "a")  # targets with no word never match
    assert contains_answer("It is Rome", "Rome") and not contains_answer("Romeo and Juliet", "Rome")
    assert answer_position("Rome, of course", "Rome") == 0
    assert answer_position("The answer is Rome", "Rome") == 2  # the leading article is dropped first
    assert answer_position("It is in the city of New York", "new york") == 6
    assert answer_position("Rome and Rome", "Rome") == 0  # the first occurrence
    assert answer_position("Romeo", "Rome") is None and answer_position("Rome", "?") is None


# ----------------------------------------------------------------------------- questions


def test_relation_tables():
    assert isinstance(RELATION_QUESTIONS, MappingProxyType) and isinstance(RELATION_CLOZE_TEMPLATES, MappingProxyType)
    assert len(RELATION_QUESTIONS) == 34 and set(RELATION_CLOZE_TEMPLATES) == set(RELATION_QUESTIONS)
    for relation, templates in RELATION_QUESTIONS.items():
        assert len(templates) == 2 and all(t.count("{}") == 1 and t.endswith("?") for t in templates), relation
    for relation, templates in RELATION_CLOZE_TEMPLATES.items():
        assert all(t.count("{}") == 1 for t in templates), relation
        lengths = [len(t) - 2 for t in templates]
        assert lengths == sorted(lengths, reverse=True), relation  # longest fixed text first
    assert questions_for("P30", "Angola") == ["Which continent is Angola located in?", "On which continent is Angola?"]
    assert questions_for("P9999", "Angola") == []


def test_cloze_subject_and_neighbor_questions():
    assert cloze_subject("P30", "South Africa is a part of the continent of") == "South Africa"
    assert cloze_subject("P30", "Ghana is in") == "Ghana"
    assert cloze_subject("P190", "The twin city of Cologne is") == "Cologne"  # text before the subject too
    assert cloze_subject("P190", "What is the twin city of Gdańsk? It is") == "Gdańsk"
    assert cloze_subject("P495", "Naruto, that was formulated in") == "Naruto"  # not "Naruto, that"
    assert cloze_subject("P30", "Where is Ghana?") is None and cloze_subject("P9999", "Ghana is in") is None
    prompts = ["Ghana is in", "Who knows Ghana", "Côte d'Ivoire is located in"]
    assert neighbor_questions("P30", prompts) == [
        "Which continent is Ghana located in?",
        "Which continent is Côte d'Ivoire located in?",
    ]
    assert neighbor_questions("P9999", prompts) == []


# ----------------------------------------------------------------------------- scripted model

REQUESTS = [
    {
        "prompt": "{} is located in the city of",
        "subject": "The Eiffel Tower",
        "target_new": "Rome",
        "question": "Where is the Eiffel Tower?",
        "paraphrase_questions": ["Which city is the Eiffel Tower in?", "Where can one see the Eiffel Tower?"],
        "neighborhood_questions": ["Where is the Louvre?", "Where is Big Ben?"],
    },
    {
        "prompt": "{} is developed by",
        "subject": "The iPhone",
        "target_new": "Microsoft",
        "question": "Who develops the iPhone?",
        "paraphrase_questions": ["Which company makes the iPhone?"],
        "neighborhood_questions": ["Who develops the iPad?"],
    },
    {  # no question: left out, its neighbor question is never asked
        "prompt": "{} plays the sport of",
        "subject": "Lionel Messi",
        "target_new": "basketball",
        "neighborhood_questions": ["What sport does Michael Jordan play?"],
    },
]

# Per question: the decoded text, the answer it is cut to, and exact / contains / position for `target_new`.
EDITED = {
    "Where is the Eiffel Tower?": " Rome. It is a city in Italy.",  # "Rome": exact, contains, position 0
    "Which city is the Eiffel Tower in?": " It is in the city of Rome.\nQ: next",  # contains only
    "Where can one see the Eiffel Tower?": " Paris",  # neither
    "Who develops the iPhone?": " The company Microsoft, in the U.S. and abroad.",  # contains, position 1
    "Which company makes the iPhone?": " microsoft.",  # exact (normalised), contains
    "Where is the Louvre?": " Rome.",  # changed, bleed
    "Where is Big Ben?": " London, England.",  # unchanged once normalised, no bleed
    "Who develops the iPad?": " Apple Inc. makes it",  # "Apple Inc": unchanged
}
UNEDITED = {
    "Where is the Louvre?": " Paris.",
    "Where is Big Ben?": " london, england",
    "Who develops the iPad?": " Apple Inc.",
}
EDITED_CHAT = {
    "Where is the Eiffel Tower?": "The answer is Rome.",  # contains, position 2
    "Which city is the Eiffel Tower in?": "Rome",  # exact
    "Where can one see the Eiffel Tower?": "Rome\nIt is a city.",  # exact
    "Who develops the iPhone?": "Apple.",  # neither
    "Which company makes the iPhone?": "Apple",  # neither
    "Where is the Louvre?": "Rome",  # changed, bleed
    "Where is Big Ben?": "London.",  # unchanged
    "Who develops the iPad?": "Apple.",  # unchanged
}
UNEDITED_CHAT = {"Where is the Louvre?": "Paris"}

# Per-case means (case 0 first), times 100; the position is a word index.
EXPECTED = {
    "wild_efficacy_exact": 100 * (1 + 0) / 2,
    "wild_paraphrase_exact": 100 * (0 / 2 + 1) / 2,
    "wild_efficacy_contains": 100 * (1 + 1) / 2,
    "wild_paraphrase_contains": 100 * (1 / 2 + 1) / 2,
    "wild_efficacy_position": (0 + 1) / 2,
    "wild_neighborhood_unchanged": 100 * (1 / 2 + 1) / 2,
    "wild_neighborhood_bleed": 100 * (1 / 2 + 0) / 2,
    "wild_questions": 5.0,
}
EXPECTED_CHAT = {
    "wild_efficacy_exact": 100 * (0 + 0) / 2,
    "wild_paraphrase_exact": 100 * (2 / 2 + 0) / 2,
    "wild_efficacy_contains": 100 * (1 + 0) / 2,
    "wild_paraphrase_contains": 100 * (2 / 2 + 0) / 2,
    "wild_efficacy_position": 2.0,
    "wild_neighborhood_unchanged": 100 * (1 / 2 + 1) / 2,
    "wild_neighborhood_bleed": 100 * (1 / 2 + 0) / 2,
    "wild_questions": 5.0,
}


def _asked(answers: dict[str, str]) -> dict[str, str]:
    """The scripted texts keyed by the question put in `WILD_CONTEXT`."""
    return {WILD_CONTEXT.format(question=question): text for question, text in answers.items()}


@contextlib.contextmanager
def _scripted_as(model, script):
    """Inside, the scripted model behaves as `script` (the "unedited" weights)."""
    saved = model.script
    model.script = script
    try:
        yield model
    finally:
        model.script = saved


def _models(tokenizer):
    chat = tokenizer.chat_template is not None
    edited = scripted_lm(tokenizer, _asked(EDITED), _asked(EDITED_CHAT) if chat else None)
    reference = scripts(
        tokenizer,
        _asked({**EDITED, **UNEDITED}),
        _asked({**EDITED_CHAT, **UNEDITED_CHAT}) if chat else None,
    )
    return edited, lambda: _scripted_as(edited, reference)


def test_cut_answers_of_the_scripted_model():
    tokenizer = build_tiny_tokenizer()
    model, _ = _models(tokenizer)
    texts = greedy_continuations(model, tokenizer, list(_asked(EDITED)), max_new_tokens=64)
    assert texts == list(EDITED.values())  # the script decodes exactly, so the figures below are exact


def test_wild_metrics_on_hand_built_answers():
    tokenizer = build_tiny_tokenizer()
    model, unedited = _models(tokenizer)
    requests = load_requests(REQUESTS)
    results = evaluate_wild(model, tokenizer, requests, unedited=unedited, batch_size=3)
    assert list(results) == list(WILD_METRIC_KEYS)
    assert results == pytest.approx(EXPECTED)
    assert model.script == scripted_lm(tokenizer, _asked(EDITED)).script  # the reference context was left
    # Without a reference the model is its own: every neighbor answer is unchanged.
    alone = evaluate_wild(model, tokenizer, requests, batch_size=2)
    assert alone == pytest.approx({**EXPECTED, "wild_neighborhood_unchanged": 100.0})
    # The family runs through `evaluate_model` with the same figures.
    assert evaluate_model(model, tokenizer, requests, metrics=["wild"], unedited=unedited) == pytest.approx(EXPECTED)


def test_chat_form_is_the_default_with_a_chat_template():
    tokenizer = build_tiny_chat_tokenizer()
    model, unedited = _models(tokenizer)
    requests = load_requests(REQUESTS)
    assert evaluate_wild(model, tokenizer, requests, unedited=unedited) == pytest.approx(EXPECTED_CHAT)
    assert evaluate_wild(model, tokenizer, requests, unedited=unedited, chat=True) == pytest.approx(EXPECTED_CHAT)
    assert evaluate_wild(model, tokenizer, requests, unedited=unedited, chat=False) == pytest.approx(EXPECTED)


def test_custom_context():
    tokenizer = build_tiny_tokenizer()
    context = "Question: {question}\nAnswer:"
    answers = {"Where is the Eiffel Tower?": " Rome", "Which city is the Eiffel Tower in?": " Paris"}
    model = scripted_lm(tokenizer, {context.format(question=q): text for q, text in answers.items()})
    request = {**REQUESTS[0], "paraphrase_questions": REQUESTS[0]["paraphrase_questions"][:1]}
    request["neighborhood_questions"] = []
    results = evaluate_wild(model, tokenizer, load_requests(request), context=context)
    assert (results["wild_efficacy_exact"], results["wild_paraphrase_exact"]) == (100.0, 0.0)
    # In the default context the script has no answer: the model stops at once, the answer is empty.
    default = evaluate_wild(model, tokenizer, load_requests(request))
    assert (default["wild_efficacy_exact"], default["wild_efficacy_contains"]) == (0.0, 0.0)


def test_missing_questions_give_nan_and_errors():
    tokenizer = build_tiny_tokenizer()
    model, _ = _models(tokenizer)
    bare = {key: REQUESTS[1][key] for key in ("prompt", "subject", "target_new", "question")}
    results = evaluate_wild(model, tokenizer, load_requests(bare))
    # The answer "The company Microsoft, in the U.S" contains the target at word 1 but is not it.
    assert (results["wild_efficacy_exact"], results["wild_efficacy_contains"]) == (0.0, 100.0)
    assert results["wild_efficacy_position"] == 1.0 and results["wild_questions"] == 1.0
    for key in ("wild_paraphrase_exact", "wild_paraphrase_contains"):
        assert math.isnan(results[key]), key
    for key in ("wild_neighborhood_unchanged", "wild_neighborhood_bleed"):
        assert math.isnan(results[key]), key
    # No answer names the target: no position.
    missed = evaluate_wild(model, tokenizer, load_requests({**bare, "target_new": "Google"}))
    assert missed["wild_efficacy_contains"] == 0.0 and math.isnan(missed["wild_efficacy_position"])

    with pytest.raises(ValueError, match=r"`question`.*none of the 1 requests"):
        evaluate_wild(model, tokenizer, load_requests(REQUESTS[2]))
    with pytest.raises(ValueError, match="none of the 0 requests"):
        evaluate_wild(model, tokenizer, [])
    with pytest.raises(ValueError, match=r"`context` must contain a `\{question\}` field"):
        evaluate_wild(model, tokenizer, load_requests(bare), context="Q: {prompt}")
    with pytest.raises(ValueError, match="chat template"):
        evaluate_wild(model, tokenizer, load_requests(bare), chat=True)


# ----------------------------------------------------------------------------- tiny random model


def test_tiny_model_scored_against_its_own_answers():
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    questions = ["Where is the Eiffel Tower?", "Who develops the iPhone?", "What sport does Lionel Messi play?"]
    options = dict(max_new_tokens=12, batch_size=4)
    texts = greedy_continuations(model, tokenizer, [WILD_CONTEXT.format(question=q) for q in questions], **options)
    answers = [cut_answer(text) for text in texts]
    asked = [(q, a) for q, a in zip(questions, answers) if exact_match(a, a)]  # answers with at least one word
    assert asked, answers

    def request(question: str, target: str) -> dict:
        return {"prompt": "{} is", "subject": "x", "target_new": target, "question": question}

    own = load_requests([request(question, answer) for question, answer in asked])
    results = evaluate_wild(model, tokenizer, own, **options)
    assert results["wild_efficacy_exact"] == results["wild_efficacy_contains"] == 100.0
    assert results["wild_efficacy_position"] == 0.0 and results["wild_questions"] == len(asked)
    unrelated = load_requests([request(question, "zebra crossing") for question, _ in asked])
    results = evaluate_wild(model, tokenizer, unrelated, **options)
    assert results["wild_efficacy_exact"] == results["wild_efficacy_contains"] == 0.0
