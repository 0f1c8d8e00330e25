"""Does the default edit of an instruct model show up where users meet it: in chat, and in answers to questions?

The 20 facts of `tests/data/smollm2_counterfact.jsonl` (which the unedited SmolLM2-135M-Instruct knows) are edited at
once with the library's defaults, whose chat context templates (`context_template_chat=None`: on for a tokenizer
with a chat template) key and optimise the edit inside the chat template, and once with
`context_template_chat=False` (the plain and sampled templates only: the defaults before the chat forms), both with
the quickstart's offline statistics. Each is evaluated with the `generative` (greedy and chat answers to the
prompts) and `wild` (a question inside a task context, sent through the chat template, decoded to a natural stop)
families. The bounds are the measured figures less a margin (see each test).
"""

from dataclasses import replace
from pathlib import Path

import pytest

from memit_hf.arguments import EditingArguments
from memit_hf.editor import Editor
from memit_hf.models import load_default_model
from memit_hf.requests import load_requests


pytestmark = pytest.mark.integration

DATA = Path(__file__).parent / "data"

QUESTIONS = {
    0: "Which city is the Eiffel Tower located in?",
    1: "Which city is the Colosseum located in?",
    2: "Which city is the Statue of Liberty located in?",
    3: "Which city is the Golden Gate Bridge located in?",
    4: "Which city is the Acropolis located in?",
    5: "Which city is the Sydney Opera House located in?",
    6: "Which city is the Kremlin located in?",
    7: "Which city is the Forbidden City located in?",
    8: "What is the capital of France?",
    9: "What is the capital of Germany?",
    10: "What is the capital of Spain?",
    11: "What is the capital of Japan?",
    12: "Which company develops the iPhone?",
    13: "Which company develops the Xbox?",
    14: "Which company develops Android?",
    15: "What is the official language of Mexico?",
    16: "What is the official language of Russia?",
    17: "Who wrote Romeo and Juliet?",
    18: "Who painted the Mona Lisa?",
    19: "What is the mother tongue of Emmanuel Macron?",
}
"""The edited facts asked as questions (the wild family's input)."""

# Measured (seed 0, CPU, float32): defaults chat ES 95.0, chat PS 65.0, wild ES (contains) 90.0, chat bleed 13.3;
# without the chat templates chat ES 85.0, chat PS 67.5, wild ES 100.0, chat bleed 6.7. Each bound is the measured
# figure less two facts (10 points; 20 facts, two paraphrases each) for float noise across machines and versions.
CHAT_ES_BOUND = 85.0
CHAT_PS_BOUND = 55.0
WILD_ES_BOUND = 80.0
CHAT_BLEED_BOUND = 23.3
CHAT_ES_GAIN_BOUND = 5.0  # measured gain 10.0 (two facts): at least one fact more than without the chat templates


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    model, tokenizer = load_default_model()
    requests = [
        replace(request, question=QUESTIONS[request.case_id])
        for request in load_requests(DATA / "smollm2_counterfact.jsonl")
    ]
    stats_cache_dir = str(tmp_path_factory.mktemp("stats"))
    results = {}
    for name, chat in (("defaults", None), ("without_chat_templates", False)):
        args = EditingArguments(
            seed=0,
            stats_sample_texts=32,
            stats_sample_length=96,
            stats_cache_dir=stats_cache_dir,
            context_template_chat=chat,
        )
        editor = Editor(model, args=args, processing_class=tokenizer, stats_dataset=None)
        editor.edit(requests)
        results[name] = editor.evaluate(requests, metrics=["counterfact", "generative", "wild"], include_pre=False)
        editor.restore()
    return results


def test_the_default_edit_is_said_in_chat_and_in_answers(figures):
    """The default edit is named in chat and in answers to questions (bounds: the measured figures less two facts)."""
    defaults = figures["defaults"]
    assert defaults["efficacy_success"] == 100.0 and defaults["paraphrase_success"] >= 90.0
    assert defaults["chat_efficacy_contains"] >= CHAT_ES_BOUND
    assert defaults["chat_paraphrase_contains"] >= CHAT_PS_BOUND
    assert defaults["wild_efficacy_contains"] >= WILD_ES_BOUND
    assert defaults["chat_neighborhood_bleed"] <= CHAT_BLEED_BOUND


def test_the_chat_templates_carry_the_edit_further_than_the_plain_templates(figures):
    """The chat forms carry the edit into chat answers to the edited prompt: without them the same edit is named in
    fewer of them (on these 20 facts the paraphrase and question figures are within two facts of each other)."""
    defaults, plain = figures["defaults"], figures["without_chat_templates"]
    assert defaults["chat_efficacy_contains"] >= plain["chat_efficacy_contains"] + CHAT_ES_GAIN_BOUND
