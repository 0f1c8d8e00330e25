"""Multi-hop (portability) metrics on MQuAKE: once all single-hop edits of a case are applied, does the model answer
the case's multi-hop questions with the new answer?

A case is the set of requests that carry the same [`~memit_hf.requests.MultiHopQuestions`] (MQuAKE records become one
request per single-hop edit, all carrying the case's questions; see [`~memit_hf.requests.load_requests`]). The
metrics only make sense once every edit of the case has been applied, e.g. after editing all the requests together.
Each question `q` is asked as `question_template.format(question=q)` (default `"Q: {q} A:"`) for the plain metrics
and as the user turn (the question itself) for the chat ones. Per question a 0/1 value; averaged over a case's
questions, then over cases, times 100; the `*_case_*` figures take MQuAKE's criterion instead (a case counts when at
least one of its questions succeeds):

- `multihop_success` (teacher-forced): the mean per-token NLL of `" " + new_answer` after the question is below that
  of `" " + answer` (the answer before the edits), as CounterFact's efficacy compares `target_new` with
  `target_true`;
- `multihop_alias_success` (teacher-forced): the lowest NLL among the new answer and its aliases is below the lowest
  among the old answer and its aliases (MQuAKE lists more aliases for well-known old answers, so this is the
  stricter test when the old side has many);
- `multihop_case_success`: MQuAKE's criterion on `multihop_alias_success`;
- `gen_multihop_accuracy`: the greedy answer (at most `max_new_tokens` tokens, cut at its first line break) contains
  the new answer or one of its aliases ([`~memit_hf.evaluation.answers.contains_answer`]);
- `gen_multihop_case_accuracy`: MQuAKE's criterion on `gen_multihop_accuracy` (its "multi-hop accuracy");
- `gen_multihop_old_answer`: the greedy answer contains the old answer or one of its aliases (before editing: does
  the model know the original chain at all);
- `chat_multihop_accuracy`, `chat_multihop_case_accuracy`, `chat_multihop_old_answer`: the same for the assistant's
  answer through the chat template; NaN, with a logged warning, when the tokenizer has none.

Cases without an old answer (`answer` is `None`) are left out of the teacher-forced figures and of the `old_answer`
ones.
"""

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..requests import EditRequest, MultiHopQuestions
from .aggregation import per_case_mean
from .answers import contains_answer
from .decoding import greedy_continuations, has_chat_template
from .scoring import target_nlls


logger = logging.getLogger(__name__)

__all__ = ["MULTIHOP_METRIC_KEYS", "MULTIHOP_QUESTION_TEMPLATE", "evaluate_multihop", "multihop_cases"]

MULTIHOP_METRIC_KEYS = (
    "multihop_success",
    "multihop_alias_success",
    "multihop_case_success",
    "gen_multihop_accuracy",
    "gen_multihop_case_accuracy",
    "gen_multihop_old_answer",
    "chat_multihop_accuracy",
    "chat_multihop_case_accuracy",
    "chat_multihop_old_answer",
)
"""The keys of the dictionary returned by [`evaluate_multihop`], in its order."""

MULTIHOP_QUESTION_TEMPLATE = "Q: {question} A:"
"""The default plain prompt of a multi-hop question."""


def multihop_cases(requests: Sequence[EditRequest]) -> list[MultiHopQuestions]:
    """The distinct multi-hop cases of `requests`, in order of first appearance.

    Requests carrying equal questions with the same `case_id` are one case (an MQuAKE record's edits); requests
    without `multi_hop` are skipped.

    Args:
        requests (`Sequence[EditRequest]`): the requests.

    Returns:
        `list[MultiHopQuestions]`: one entry per case.
    """
    seen: dict[tuple, MultiHopQuestions] = {}
    for request in requests:
        questions = request.multi_hop
        if questions is None:
            continue
        key = (request.case_id, tuple(questions.questions), questions.new_answer, questions.answer)
        seen.setdefault(key, questions)
    return list(seen.values())


@dataclass
class _Question:
    case: int
    prompt: str
    question: str
    new_answers: list[str]
    old_answers: list[str]


def _rate(values: Sequence[float], cases: Sequence[int]) -> float:
    return per_case_mean(values, cases) * 100.0


def _any_rate(values: Sequence[float], cases: Sequence[int]) -> float:
    """Share of cases (times 100) with at least one true value; NaN without cases."""
    best: dict[int, float] = {}
    for value, case in zip(values, cases):
        best[case] = max(best.get(case, 0.0), float(value))
    return 100.0 * sum(best.values()) / len(best) if best else math.nan


def _unique(answers: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(answer for answer in answers if answer.strip()))


def evaluate_multihop(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: list[EditRequest],
    question_template: str = MULTIHOP_QUESTION_TEMPLATE,
    max_new_tokens: int = 16,
    chat: bool | None = None,
    chat_max_new_tokens: int = 32,
    batch_size: int = 32,
) -> dict[str, float]:
    """Run the multi-hop tests (see the module docstring for the exact definitions) on `model`.

    All (question, answer) pairs go through one batched teacher-forced
    [`~memit_hf.evaluation.scoring.target_nlls`] call; the questions are decoded greedily in one
    [`~memit_hf.evaluation.decoding.greedy_continuations`] call, and once more through the chat template.

    Args:
        model (`PreTrainedModel`):
            The causal language model, with all the edits of the evaluated cases applied.
        tokenizer (`PreTrainedTokenizerBase`):
            The model's tokenizer.
        requests (`list[EditRequest]`):
            The requests; those carrying `multi_hop` questions define the cases ([`multihop_cases`]).
        question_template (`str`, *optional*, defaults to `"Q: {question} A:"`):
            The plain prompt of a question, with `{question}` where the question goes.
        max_new_tokens (`int`, *optional*, defaults to 16):
            Tokens generated after each plain prompt.
        chat (`bool`, *optional*):
            Run the chat variants. By default they run when the tokenizer has a chat template, and are NaN (with a
            warning) otherwise.
        chat_max_new_tokens (`int`, *optional*, defaults to 32):
            Tokens generated for each chat answer.
        batch_size (`int`, *optional*, defaults to 32):
            Pairs per forward pass, and prompts per `generate` call.

    Returns:
        `dict[str, float]`: the metrics under `MULTIHOP_METRIC_KEYS`, in percent.

    Raises:
        ValueError: when no request carries multi-hop questions, `question_template` has no `{question}` field, or
            `chat=True` and the tokenizer has no chat template.
    """
    cases = multihop_cases(requests)
    if not cases:
        raise ValueError(
            "No request carries multi-hop questions (`multi_hop`); load MQuAKE records (a list `requested_rewrite` "
            "with `questions`, `new_answer`, `answer`) or give canonical records a `multi_hop` field."
        )
    if "{question}" not in question_template:
        raise ValueError(f"`question_template` must contain a `{{question}}` field (got {question_template!r}).")
    if chat is None:
        chat = has_chat_template(tokenizer)
        if not chat:
            logger.warning("The tokenizer has no chat template: the chat multi-hop metrics are reported as NaN.")
    elif chat and not has_chat_template(tokenizer):
        raise ValueError("`chat=True` needs a tokenizer with a chat template (`tokenizer.chat_template`).")

    questions = [
        _Question(
            case=position,
            prompt=question_template.format(question=question),
            question=question,
            new_answers=_unique([case.new_answer, *case.new_answer_aliases]),
            old_answers=_unique([case.answer, *case.answer_aliases]) if case.answer is not None else [],
        )
        for position, case in enumerate(cases)
        for question in case.questions
    ]
    results = dict.fromkeys(MULTIHOP_METRIC_KEYS, math.nan)

    # Teacher-forced: every answer and alias of both sides after every question, in one batched call.
    scored = [q for q in questions if q.old_answers]
    prompts, targets, spans = [], [], []
    for q in scored:
        start = len(targets)
        for answer in q.new_answers + q.old_answers:
            prompts.append(q.prompt)
            targets.append(answer)
        spans.append((start, start + len(q.new_answers), start + len(q.new_answers) + len(q.old_answers)))
    if scored:
        nlls, _ = target_nlls(model, tokenizer, prompts, targets, batch_size)
        main = [float(nlls[new] < nlls[old]) for new, old, _ in spans]
        aliased = [float(nlls[new:old].min() < nlls[old:end].min()) for new, old, end in spans]
        owners = [q.case for q in scored]
        results["multihop_success"] = _rate(main, owners)
        results["multihop_alias_success"] = _rate(aliased, owners)
        results["multihop_case_success"] = _any_rate(aliased, owners)

    # Generative: the plain answer is cut at its first line break (the model going on to another "Q:" is not part
    # of its answer).
    owners = [q.case for q in questions]
    variants = [("gen", [q.prompt for q in questions], dict(max_new_tokens=max_new_tokens), True)]
    if chat:
        variants.append(("chat", [q.question for q in questions], dict(max_new_tokens=chat_max_new_tokens), False))
    for prefix, texts, options, first_line in variants:
        answers = greedy_continuations(
            model, tokenizer, texts, batch_size=batch_size, chat=prefix == "chat", **options
        )
        if first_line:
            answers = [answer.strip().split("\n")[0] for answer in answers]
        hits = [float(contains_answer(answer, q.new_answers)) for answer, q in zip(answers, questions)]
        results[f"{prefix}_multihop_accuracy"] = _rate(hits, owners)
        results[f"{prefix}_multihop_case_accuracy"] = _any_rate(hits, owners)
        known = [(answer, q) for answer, q in zip(answers, questions) if q.old_answers]
        results[f"{prefix}_multihop_old_answer"] = _rate(
            [float(contains_answer(answer, q.old_answers)) for answer, q in known], [q.case for _, q in known]
        )
    return results
