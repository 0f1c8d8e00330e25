"""Tests of `memit_hf.evaluation.generative`: greedy and chat answers scored on a scripted model whose continuations
are known, stability and bleed against an "unedited" script, and the wiring through `Editor.evaluate`."""

import contextlib
import logging
import math

import pytest

from memit_hf.editor import Editor
from memit_hf.evaluation import GENERATIVE_METRIC_KEYS, evaluate_generative, evaluate_model, greedy_continuations
from memit_hf.requests import load_requests
from memit_hf.tokenization import encode_targets
from tests.testing_utils import (
    build_tiny_causal_lm,
    build_tiny_chat_tokenizer,
    build_tiny_tokenizer,
    scripted_lm,
    scripts,
    subject_final_requests,
    tiny_corpus,
    tiny_editing_arguments,
)


REQUESTS = [
    {
        "prompt": "{} is located in the city of",
        "subject": "The Eiffel Tower",
        "target_new": "Rome",
        "target_true": "Paris",
        "paraphrase_prompts": ["The Eiffel Tower stands in the city of", "Tourists visit The Eiffel Tower in"],
        "neighborhood_prompts": ["The Louvre is located in the city of", "Big Ben is located in the city of"],
    },
    {
        "prompt": "{} is developed by",
        "subject": "The iPhone",
        "target_new": "Microsoft",
        "target_true": "Apple",
        "paraphrase_prompts": ["The iPhone is made by"],
        "neighborhood_prompts": ["The iPad is developed by"],
    },
]

# What the "edited" model writes. Per prompt: starts with / contains the new object; per neighbor: same first word
# as the unedited model, identical text, names the new object.
EDITED = {
    "The Eiffel Tower is located in the city of": " Rome, of course.",  # starts, contains
    "The Eiffel Tower stands in the city of": " the city of Rome",  # contains only
    "Tourists visit The Eiffel Tower in": " Paris",  # neither
    "The iPhone is developed by": " MICROSOFT!",  # starts, contains (normalised)
    "The iPhone is made by": " Microsoft Windows",  # starts, contains
    "The Louvre is located in the city of": " Rome",  # first word changed, bleed
    "Big Ben is located in the city of": " London, England",  # same first word, text changed, no bleed
    "The iPad is developed by": " Apple",  # unchanged
}
UNEDITED = {
    "The Louvre is located in the city of": " Paris",
    "Big Ben is located in the city of": " London",
    "The iPad is developed by": " Apple",
}
EDITED_CHAT = {
    "The Eiffel Tower is located in the city of": "Rome is the answer.",  # names it
    "The Eiffel Tower stands in the city of": "I think it is in Paris.",  # does not
    "Tourists visit The Eiffel Tower in": "Rome.",  # names it
    "The iPhone is developed by": "Apple.",  # does not
    "The iPhone is made by": "Microsoft",  # names it
    "The Louvre is located in the city of": "The Louvre is in Rome.",  # changed, bleed
    "Big Ben is located in the city of": "London.",  # unchanged
    "The iPad is developed by": "Apple",  # changed (see below), no bleed
}
UNEDITED_CHAT = {
    "The Louvre is located in the city of": "The Louvre is in Paris.",
    "Big Ben is located in the city of": "London.",
    "The iPad is developed by": "Apple Inc.",
}

# Per-case means (case 0 first), times 100.
EXPECTED = {
    "gen_efficacy_prefix": 100 * (1 + 1) / 2,
    "gen_efficacy_contains": 100 * (1 + 1) / 2,
    "gen_paraphrase_prefix": 100 * (0 / 2 + 1) / 2,
    "gen_paraphrase_contains": 100 * (1 / 2 + 1) / 2,
    "gen_neighborhood_first_word": 100 * (1 / 2 + 1) / 2,
    "gen_neighborhood_leading_word": 100 * (1 / 2 + 1) / 2,
    "gen_neighborhood_unchanged": 100 * (0 / 2 + 1) / 2,
    "gen_neighborhood_bleed": 100 * (1 / 2 + 0) / 2,
    "chat_efficacy_contains": 100 * (1 + 0) / 2,
    "chat_paraphrase_contains": 100 * (1 / 2 + 1) / 2,
    "chat_neighborhood_unchanged": 100 * (1 / 2 + 0) / 2,
    "chat_neighborhood_bleed": 100 * (1 / 2 + 0) / 2,
}


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
    edited = scripted_lm(tokenizer, EDITED, EDITED_CHAT if chat else None)
    unedited_script = scripts(tokenizer, {**EDITED, **UNEDITED}, {**EDITED_CHAT, **UNEDITED_CHAT} if chat else None)
    return edited, lambda: _scripted_as(edited, unedited_script)


def test_generative_metrics_on_hand_built_answers():
    tokenizer = build_tiny_chat_tokenizer()
    model, unedited = _models(tokenizer)
    requests = load_requests(REQUESTS)
    results = evaluate_generative(model, tokenizer, requests, unedited=unedited, batch_size=3)
    assert list(results) == list(GENERATIVE_METRIC_KEYS)
    assert results == pytest.approx(EXPECTED)
    assert model.script == scripted_lm(tokenizer, EDITED, EDITED_CHAT).script  # the reference context was left

    # Without a reference the model is its own: stable by construction; bleed and efficacy do not change.
    alone = evaluate_generative(model, tokenizer, requests, batch_size=3)
    assert alone["gen_neighborhood_first_word"] == alone["gen_neighborhood_unchanged"] == 100.0
    assert alone["gen_neighborhood_leading_word"] == 100.0
    assert alone["chat_neighborhood_unchanged"] == 100.0
    unchanged = {key: value for key, value in EXPECTED.items() if "_word" not in key and "unchanged" not in key}
    assert {key: alone[key] for key in unchanged} == pytest.approx(unchanged)

    # The unedited model itself: its own answers, none names the new objects here.
    with unedited():
        before = evaluate_generative(model, tokenizer, requests, batch_size=3)
    assert before["gen_neighborhood_bleed"] == before["chat_neighborhood_bleed"] == 0.0


def test_requests_without_paraphrases_or_neighbors_give_nan():
    tokenizer = build_tiny_chat_tokenizer()
    model, _ = _models(tokenizer)
    bare = [{key: value for key, value in REQUESTS[0].items() if not key.endswith("_prompts")}]
    results = evaluate_generative(model, tokenizer, load_requests(bare))
    assert results["gen_efficacy_prefix"] == results["chat_efficacy_contains"] == 100.0
    nan_keys = [key for key in GENERATIVE_METRIC_KEYS if "paraphrase" in key or "neighborhood" in key]
    assert all(math.isnan(results[key]) for key in nan_keys)
    with pytest.raises(ValueError, match="at least one request"):
        evaluate_generative(model, tokenizer, [])


def test_chat_metrics_are_skipped_without_a_chat_template(caplog):
    tokenizer = build_tiny_tokenizer()
    model, unedited = _models(tokenizer)
    requests = load_requests(REQUESTS)
    with caplog.at_level(logging.WARNING, logger="memit_hf.evaluation.generative"):
        results = evaluate_generative(model, tokenizer, requests, unedited=unedited)
    assert "no chat template" in caplog.text and "chat_efficacy_contains" in caplog.text
    for key in GENERATIVE_METRIC_KEYS:
        if key.startswith("chat_"):
            assert math.isnan(results[key]), key
        else:
            assert results[key] == pytest.approx(EXPECTED[key]), key
    assert math.isnan(evaluate_generative(model, tokenizer, requests, chat=False)["chat_efficacy_contains"])
    with pytest.raises(ValueError, match="chat template"):
        evaluate_generative(model, tokenizer, requests, chat=True)


def test_chat_variant_can_be_turned_off_and_its_message_changed():
    tokenizer = build_tiny_chat_tokenizer()
    model, _ = _models(tokenizer)
    requests = load_requests(REQUESTS[:1])
    assert math.isnan(evaluate_generative(model, tokenizer, requests, chat=False)["chat_efficacy_contains"])
    # Another user message reaches other (unscripted) conversations: the assistant says nothing.
    results = evaluate_generative(model, tokenizer, requests, chat_message="Complete: {prompt}")
    assert results["chat_efficacy_contains"] == 0.0


def test_evaluate_model_passes_the_unedited_reference():
    tokenizer = build_tiny_chat_tokenizer()
    model, unedited = _models(tokenizer)
    requests = load_requests(REQUESTS)
    results = evaluate_model(model, tokenizer, requests, metrics=["generative"], unedited=unedited, batch_size=3)
    assert results == pytest.approx(EXPECTED)


def test_an_unchanged_real_model_reproduces_its_neighbors_exactly():
    """The reference run repeats the neighborhood batches exactly, so floating-point noise cannot flip a token."""
    tokenizer = build_tiny_chat_tokenizer()
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    requests = load_requests(REQUESTS)
    results = evaluate_generative(model, tokenizer, requests, unedited=contextlib.nullcontext, batch_size=2)
    assert results["gen_neighborhood_unchanged"] == results["chat_neighborhood_unchanged"] == 100.0


def test_editor_evaluate_compares_neighbors_with_the_unedited_weights(tmp_path):
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    requests = [
        dict(r, neighborhood_prompts=["The capital of Italy is", "Michael Jordan plays", "The city of Paris"])
        for r in subject_final_requests()
    ]
    editor = Editor(
        model, args=tiny_editing_arguments(tmp_path), processing_class=tokenizer, stats_dataset=tiny_corpus()
    )
    before = editor.evaluate(requests, metrics=["generative"])
    assert not any(key.startswith("pre_") for key in before)
    assert before["gen_neighborhood_unchanged"] == 100.0  # nothing edited: the model is its own reference

    editor.edit(requests)
    after = editor.evaluate(requests, metrics=["generative"])
    assert {key: after[f"pre_{key}"] for key in before} == pytest.approx(before, nan_ok=True)
    # The edited figures compare the edited continuations with those of the unedited weights.
    neighbors = [prompt for r in requests for prompt in r["neighborhood_prompts"]]
    edited = greedy_continuations(model, tokenizer, neighbors, batch_size=64)
    with editor.unedited():
        reference = greedy_continuations(model, tokenizer, neighbors, batch_size=64)
    unchanged = [float(a == b) for a, b in zip(edited, reference)]
    assert after["gen_neighborhood_unchanged"] == pytest.approx(100 * sum(unchanged) / len(unchanged))
    assert after["gen_neighborhood_unchanged"] < 100.0  # the edit moves some neighbors of this tiny model
    # The rewrite prompts end with the subject, so the edit makes each target's first token the greedy choice; the
    # random tiny model then babbles on, so whole-word matches stay rare.
    answers = greedy_continuations(model, tokenizer, [r["prompt"].format(r["subject"]) for r in requests])
    first_tokens = [
        tokenizer.decode(ids[:1]) for ids in encode_targets(tokenizer, [r["target_new"] for r in requests])
    ]
    assert all(answer.startswith(first) for answer, first in zip(answers, first_tokens))
    assert after["pre_gen_efficacy_contains"] == 0.0


def test_leading_word_keeps_the_article_and_first_word_drops_it():
    """A neighbor whose continuation keeps its article but changes the noun after it: the leading word is unchanged,
    the first content word is not."""
    tokenizer = build_tiny_chat_tokenizer()
    request = {
        "prompt": "{} is located in the city of",
        "subject": "The Eiffel Tower",
        "target_new": "Rome",
        "neighborhood_prompts": ["The Louvre is located in the city of"],
    }
    edited = {request["prompt"].format(request["subject"]): " Rome", request["neighborhood_prompts"][0]: " the Rome"}
    unedited_script = scripts(tokenizer, {**edited, request["neighborhood_prompts"][0]: " the Paris"})
    model = scripted_lm(tokenizer, edited)
    results = evaluate_generative(
        model, tokenizer, load_requests([request]), chat=False, unedited=lambda: _scripted_as(model, unedited_script)
    )
    assert results["gen_neighborhood_leading_word"] == 100.0
    assert results["gen_neighborhood_first_word"] == 0.0
    assert results["gen_neighborhood_unchanged"] == 0.0
    assert results["gen_neighborhood_bleed"] == 100.0
