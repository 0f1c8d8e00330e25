"""Question answering in the wild: does the edited model *answer* a question about the edited fact with the new
object, when it decodes freely inside a task context and stops where it would?

After WILD, the protocol of "The Mirage of Model Editing" (Yang et al., ACL 2025,
[arXiv 2502.11177](https://huggingface.co/papers/2502.11177); reference code: the `test_prediction_acc_real` function
of `easyeditor/evaluate/evaluate_utils.py` in `WanliYoung/Revisit-Editing-Evaluation`). Teacher-forced figures
(P(new) > P(old)) score continuations the model is given; here each question ([`~memit_hf.EditRequest.question`],
`paraphrase_questions`, `neighborhood_questions`) is put in a task context (`WILD_CONTEXT`, or the same text as the
user turn of the chat template), the model decodes greedily until its EOS or `max_new_tokens`
([`~memit_hf.evaluation.decoding.greedy_continuations`]), and the *answer* is that text cut at its first sentence stop
([`cut_answer`]: the first line break, or the first `"."` followed by whitespace or the end), as the reference's stop
strings `"."` and `"\\n"` cut it.

Per question (each a 0/1 value), averaged within each case, then across the cases that have such questions, times
100 (NaN when no case has such a question):

- `wild_efficacy_exact` / `wild_paraphrase_exact`: the answer to the question / to a paraphrase of it equals
  `target_new` after normalisation ([`exact_match`]: SQuAD's exact match, with the text normalised as
  [`~memit_hf.evaluation.answers.normalize_answer`] does and every article dropped);
- `wild_efficacy_contains` / `wild_paraphrase_contains`: the answer contains `target_new`
  ([`~memit_hf.evaluation.answers.contains_answer`], whole words): laxer, it accepts "It is Rome";
- `wild_efficacy_position`: over the efficacy answers that contain `target_new`, the mean word index at which it
  starts ([`answer_position`]; 0 when the answer opens with it): how long the model talks before naming it (not a
  percentage);
- `wild_neighborhood_unchanged`: the (normalised) answer to a neighborhood question equals the unedited model's;
- `wild_neighborhood_bleed`: the answer to a neighborhood question contains `target_new`;
- `wild_questions`: the number of questions evaluated whose answer is `target_new` (efficacy and paraphrase), so that
  a reader sees the coverage.

Requests without a `question` are left out. The neighborhood's reference is decoded inside `unedited()` (e.g.
[`~memit_hf.Editor.unedited`]) with exactly the same batches; without it the model is its own reference (100).
"""

import logging
import re
from collections.abc import Callable
from contextlib import AbstractContextManager

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..requests import EditRequest
from .aggregation import per_case_mean, per_case_rate
from .answers import ARTICLES, answer_words, contains_answer, normalize_answer
from .decoding import greedy_continuations, has_chat_template


logger = logging.getLogger(__name__)

__all__ = ["WILD_CONTEXT", "WILD_METRIC_KEYS", "answer_position", "cut_answer", "evaluate_wild", "exact_match"]

WILD_CONTEXT = "Please answer the question:\n\nQ: {question}\nA:"
"""The task context of each question (the WILD protocol's question-answering instruction), with `{question}` where
the question goes; with a chat template it is the user turn."""

WILD_METRIC_KEYS = (
    "wild_efficacy_exact",
    "wild_paraphrase_exact",
    "wild_efficacy_contains",
    "wild_paraphrase_contains",
    "wild_efficacy_position",
    "wild_neighborhood_unchanged",
    "wild_neighborhood_bleed",
    "wild_questions",
)
"""The keys of the dictionary returned by [`evaluate_wild`], in its order."""

ANSWER_STOP_STRINGS = ("\n", ". ")
"""Where the decoding of a wild answer may stop: past the first line break or sentence end, which [`cut_answer`]
cuts at."""

_SENTENCE_STOP = re.compile(r"\n|\.(?=\s|$)")


def cut_answer(text: str) -> str:
    """The answer in a decoded text: the text up to its first line break or its first `"."` that ends a sentence
    (followed by whitespace or the end of the text), stripped.

    A `"."` inside a word or a number does not cut (`"U.S"` in `"U.S. Army"` is kept to its last dot, `"3.5"`
    whole).

    Args:
        text (`str`): the decoded continuation, e.g. `" Rome. It is the capital of Italy."`.

    Returns:
        `str`: e.g. `"Rome"`; `""` when the text opens with a line break.
    """
    match = _SENTENCE_STOP.search(text)
    return (text if match is None else text[: match.start()]).strip()


def _exact_form(text: str) -> str:
    """The SQuAD exact-match form: `normalize_answer` without any article."""
    return " ".join(word for word in normalize_answer(text, drop_article=False).split(" ") if word not in ARTICLES)


def exact_match(answer: str, target: str) -> bool:
    """SQuAD's exact match: the answer and the target are equal once normalised.

    Both are normalised as [`~memit_hf.evaluation.answers.normalize_answer`] does (accents dropped, lower case,
    punctuation and symbols turned into spaces, whitespace collapsed) and every article (`a`, `an`, `the`) is dropped,
    as SQuAD's normalisation drops them. A target that normalises to nothing never matches.

    Args:
        answer (`str`): the model's answer (e.g. from [`cut_answer`]).
        target (`str`): the expected answer.

    Returns:
        `bool`: e.g. `True` for `"The Rome"` and `"rome."`, `False` for `"It is Rome"` and `"Rome"`.
    """
    expected = _exact_form(target)
    return bool(expected) and _exact_form(answer) == expected


def answer_position(answer: str, target: str) -> int | None:
    """The word index at which `target` first starts in `answer`, both as
    [`~memit_hf.evaluation.answers.answer_words`] (a leading article dropped).

    Args:
        answer (`str`): the model's answer, e.g. `"It is in Rome"`.
        target (`str`): the expected answer, e.g. `"Rome"`.

    Returns:
        `int` or `None`: e.g. `3` (`0` when the answer opens with the target); `None` when the answer does not
        contain it ([`~memit_hf.evaluation.answers.contains_answer`] is then `False`).
    """
    words, expected = answer_words(answer), answer_words(target)
    if not expected:
        return None
    for start in range(len(words) - len(expected) + 1):
        if words[start : start + len(expected)] == expected:
            return start
    return None


def evaluate_wild(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: list[EditRequest],
    unedited: Callable[[], AbstractContextManager] | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 32,
    context: str = WILD_CONTEXT,
    chat: bool | None = None,
) -> dict[str, float]:
    """Ask the requests' questions in a task context and score the model's free answers (see the module docstring
    for the exact definitions).

    Decoding is greedy and batched: the questions and paraphrase questions of all requests in one
    [`~memit_hf.evaluation.decoding.greedy_continuations`] call, the neighborhood questions in another, repeated
    inside `unedited()` for the reference with exactly the same batches (so an unchanged model reproduces its answers
    bit for bit).

    Args:
        model (`PreTrainedModel`):
            The (edited) causal language model.
        tokenizer (`PreTrainedTokenizerBase`):
            The model's tokenizer.
        requests (`list[EditRequest]`):
            The requests: `question`, `paraphrase_questions`, `neighborhood_questions` and `target_new` are used;
            requests without a `question` are left out.
        unedited (`Callable[[], AbstractContextManager]`, *optional*):
            Returns a context manager inside which `model` computes with its unedited weights (e.g.
            `editor.unedited`). By default the model as it is serves as its own reference (unchanged = 100).
        max_new_tokens (`int`, *optional*, defaults to 64):
            The cap of free decoding (the answer ends at the model's EOS or its first sentence stop well before it).
        batch_size (`int`, *optional*, defaults to 32):
            Questions per `generate` call.
        context (`str`, *optional*, defaults to `WILD_CONTEXT`):
            The text each question is asked in, with `{question}` where it goes.
        chat (`bool`, *optional*):
            Send the context as the user turn of the chat template. By default the chat form is used when the
            tokenizer has a chat template, the plain text otherwise; `chat=False` forces the plain text.

    Returns:
        `dict[str, float]`: the metrics under `WILD_METRIC_KEYS`: percentages, except `wild_efficacy_position` (a
        word index) and `wild_questions` (a count).

    Raises:
        ValueError: when no request has a `question`, `context` has no `{question}` field, or `chat=True` and the
            tokenizer has no chat template.
    """
    asked = [(case, request) for case, request in enumerate(requests) if request.question]
    if not asked:
        raise ValueError(
            "`evaluate_wild` needs requests with a `question` (the edited fact asked as a question; the zsRE, MQuAKE "
            "and CounterFact loaders fill it, canonical records take it as the field `question`): none of the "
            f"{len(requests)} requests has one."
        )
    if "{question}" not in context:
        raise ValueError(f"`context` must contain a `{{question}}` field (got {context!r}).")
    if chat is None:
        chat = has_chat_template(tokenizer)
    elif chat and not has_chat_template(tokenizer):
        raise ValueError("`chat=True` needs a tokenizer with a chat template (`tokenizer.chat_template`).")
    if len(asked) < len(requests):
        logger.info(
            "%d of %d requests have no `question` and are left out.", len(requests) - len(asked), len(requests)
        )

    edited_questions: list[str] = []
    edited_items: list[tuple[int, bool, str]] = []  # (case, is the efficacy question, target_new)
    neighbor_questions: list[str] = []
    neighbor_items: list[tuple[int, str]] = []  # (case, target_new)
    for case, request in asked:
        for question, efficacy in [(request.question, True)] + [(q, False) for q in request.paraphrase_questions]:
            edited_questions.append(question)
            edited_items.append((case, efficacy, request.target_new))
        for question in request.neighborhood_questions:
            neighbor_questions.append(question)
            neighbor_items.append((case, request.target_new))

    if chat:
        options = dict(chat=True, chat_message=context.replace("{question}", "{prompt}"))
    else:
        options = {}

    def answers(questions: list[str]) -> list[str]:
        texts = questions if chat else [context.replace("{question}", question) for question in questions]
        # Decoding stops at the first "\n" or ". ": every cut `cut_answer` makes lies before them, so the answers are
        # those of decoding to EOS, at a fraction of the tokens.
        decoded = greedy_continuations(
            model,
            tokenizer,
            texts,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            stop_strings=ANSWER_STOP_STRINGS,
            **options,
        )
        return [cut_answer(text) for text in decoded]

    edited_answers = answers(edited_questions)
    neighbor_answers = answers(neighbor_questions)
    if unedited is None:
        references = neighbor_answers
    else:
        with unedited():
            references = answers(neighbor_questions)

    results: dict[str, float] = {}
    for efficacy, name in ((True, "efficacy"), (False, "paraphrase")):
        selected = [i for i, item in enumerate(edited_items) if item[1] == efficacy]
        cases = [edited_items[i][0] for i in selected]
        targets = [edited_items[i][2] for i in selected]
        texts = [edited_answers[i] for i in selected]
        results[f"wild_{name}_exact"] = per_case_rate(map(exact_match, texts, targets), cases)
        results[f"wild_{name}_contains"] = per_case_rate(map(contains_answer, texts, targets), cases)
        if efficacy:
            positions = [(case, answer_position(text, target)) for case, text, target in zip(cases, texts, targets)]
            found = [(case, float(position)) for case, position in positions if position is not None]
            results["wild_efficacy_position"] = per_case_mean([p for _, p in found], [case for case, _ in found])
    cases = [case for case, _ in neighbor_items]
    targets = [target for _, target in neighbor_items]
    same = [_exact_form(answer) == _exact_form(reference) for answer, reference in zip(neighbor_answers, references)]
    results["wild_neighborhood_unchanged"] = per_case_rate(same, cases)
    results["wild_neighborhood_bleed"] = per_case_rate(map(contains_answer, neighbor_answers, targets), cases)
    results["wild_questions"] = float(len(edited_questions))
    return {key: results[key] for key in WILD_METRIC_KEYS}
