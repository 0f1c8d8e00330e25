"""Generative CounterFact metrics: does the model *say* the new object when it decodes greedily, plainly or as a chat
assistant, and do its answers to the neighborhood prompts stay as they were?

The teacher-forced metrics ([`~memit_hf.evaluation.evaluate_counterfact`]) only compare the probabilities of two
given continuations. Here the model writes its own continuation ([`~memit_hf.evaluation.decoding.greedy_continuations`],
greedy, so deterministic), and the text is matched against the targets with the word-level tests of
[`~memit_hf.evaluation.answers`] (normalised case, accents, punctuation, whitespace and leading article).

Per prompt (each a 0/1 value), averaged within each case, then across the cases that have such prompts, times 100
(as every CounterFact metric; NaN when no case has a prompt of that kind):

- `gen_efficacy_prefix` / `gen_paraphrase_prefix`: the greedy continuation of the rewrite prompt / of a paraphrase
  prompt starts with `target_new` ([`~memit_hf.evaluation.answers.starts_with_answer`]);
- `gen_efficacy_contains` / `gen_paraphrase_contains`: it contains `target_new` anywhere
  ([`~memit_hf.evaluation.answers.contains_answer`]);
- `gen_neighborhood_first_word`: the first word of a neighborhood prompt's continuation
  ([`~memit_hf.evaluation.answers.first_word`], the first content word: a leading article dropped) equals the
  first word of the unedited model's continuation;
- `gen_neighborhood_leading_word`: the same with the article kept
  ([`~memit_hf.evaluation.answers.leading_word`]): laxer, since most continuations start with "the" or "a";
- `gen_neighborhood_unchanged`: the whole decoded continuation is identical to the unedited model's;
- `gen_neighborhood_bleed`: the continuation contains `target_new` (the edited object leaks into facts about other
  subjects; compare with the unedited model's `pre_` figure, which counts neighbors that say it anyway);
- `chat_efficacy_contains` / `chat_paraphrase_contains`: through the chat template (the prompt as one user turn,
  [`~memit_hf.evaluation.decoding.chat_texts`]), the assistant's answer names `target_new`;
- `chat_neighborhood_unchanged` / `chat_neighborhood_bleed`: the assistant's answer to a neighborhood prompt is
  identical to the unedited model's / names `target_new`.

The chat metrics are NaN, with a logged warning, when the tokenizer has no chat template.

The neighborhood's reference is the unedited model's greedy continuation: pass `unedited`, a factory of context
managers inside which the model has its original weights (e.g. [`~memit_hf.Editor.unedited`], or a peft model's
`disable_adapter`). Without it the reference is the model as it is, and both stability figures are 100 by
construction, which is right for an unedited model.
"""

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..requests import EditRequest
from .aggregation import PARAPHRASE, REWRITE, per_case_rate
from .answers import contains_answer, first_word, leading_word, starts_with_answer
from .decoding import DEFAULT_CHAT_MESSAGE, greedy_continuations, has_chat_template


logger = logging.getLogger(__name__)

__all__ = ["GENERATIVE_METRIC_KEYS", "evaluate_generative"]

GENERATIVE_METRIC_KEYS = (
    "gen_efficacy_prefix",
    "gen_efficacy_contains",
    "gen_paraphrase_prefix",
    "gen_paraphrase_contains",
    "gen_neighborhood_first_word",
    "gen_neighborhood_leading_word",
    "gen_neighborhood_unchanged",
    "gen_neighborhood_bleed",
    "chat_efficacy_contains",
    "chat_paraphrase_contains",
    "chat_neighborhood_unchanged",
    "chat_neighborhood_bleed",
)
"""The keys of the dictionary returned by [`evaluate_generative`], in its order."""

_CHAT_KEYS = tuple(key for key in GENERATIVE_METRIC_KEYS if key.startswith("chat_"))


def _same_first_word(text: str, reference: str) -> bool:
    return first_word(text) == first_word(reference)


def _same_leading_word(text: str, reference: str) -> bool:
    return leading_word(text) == leading_word(reference)


def evaluate_generative(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: list[EditRequest],
    unedited: Callable[[], AbstractContextManager] | None = None,
    max_new_tokens: int = 16,
    chat: bool | None = None,
    chat_max_new_tokens: int = 32,
    chat_message: str = DEFAULT_CHAT_MESSAGE,
    batch_size: int = 32,
) -> dict[str, float]:
    """Run the generative CounterFact tests (see the module docstring for the exact definitions) on `model`.

    Decoding is greedy and batched: the rewrite and paraphrase prompts of all requests in one
    [`~memit_hf.evaluation.decoding.greedy_continuations`] call, the neighborhood prompts in another, and the same
    again through the chat template. The neighborhood call is repeated inside `unedited()` for the reference, with
    exactly the same batches, so an unchanged model reproduces its continuations bit for bit.

    Args:
        model (`PreTrainedModel`):
            The (edited) causal language model.
        tokenizer (`PreTrainedTokenizerBase`):
            The model's tokenizer.
        requests (`list[EditRequest]`):
            The requests: `target_new`, the rewrite prompt (`request.text`), `paraphrase_prompts` and
            `neighborhood_prompts` are used.
        unedited (`Callable[[], AbstractContextManager]`, *optional*):
            Returns a context manager inside which `model` computes with its unedited weights (e.g.
            `editor.unedited`). By default the model as it is serves as its own reference (stability 100).
        max_new_tokens (`int`, *optional*, defaults to 16):
            Tokens generated after each plain prompt.
        chat (`bool`, *optional*):
            Run the chat variants. By default they run when the tokenizer has a chat template, and are NaN (with a
            warning) otherwise.
        chat_max_new_tokens (`int`, *optional*, defaults to 32):
            Tokens generated for each chat answer.
        chat_message (`str`, *optional*, defaults to `"{prompt}"`):
            The user message of the chat variants, with `{prompt}` where the prompt goes.
        batch_size (`int`, *optional*, defaults to 32):
            Prompts per `generate` call.

    Returns:
        `dict[str, float]`: the metrics under `GENERATIVE_METRIC_KEYS`, in percent.

    Raises:
        ValueError: when `requests` is empty, or `chat=True` and the tokenizer has no chat template.
    """
    if not requests:
        raise ValueError("`evaluate_generative` needs at least one request.")
    if chat is None:
        chat = has_chat_template(tokenizer)
        if not chat:
            logger.warning(
                "The tokenizer has no chat template: the chat metrics (%s) are skipped and reported as NaN.",
                ", ".join(_CHAT_KEYS),
            )
    elif chat and not has_chat_template(tokenizer):
        raise ValueError("`chat=True` needs a tokenizer with a chat template (`tokenizer.chat_template`).")

    # Rewrite and paraphrase prompts (answered with the new object), and neighborhood prompts (answers kept).
    edited_prompts: list[str] = []
    edited_items: list[tuple[int, str, str]] = []
    neighbor_prompts: list[str] = []
    neighbor_items: list[tuple[int, str]] = []
    for case, request in enumerate(requests):
        for prompt, kind in [(request.text, REWRITE)] + [(p, PARAPHRASE) for p in request.paraphrase_prompts]:
            edited_prompts.append(prompt)
            edited_items.append((case, kind, request.target_new))
        for prompt in request.neighborhood_prompts:
            neighbor_prompts.append(prompt)
            neighbor_items.append((case, request.target_new))

    plain = dict(max_new_tokens=max_new_tokens, batch_size=batch_size)
    chatted = dict(max_new_tokens=chat_max_new_tokens, batch_size=batch_size, chat=True, chat_message=chat_message)
    answers = greedy_continuations(model, tokenizer, edited_prompts, **plain)
    neighbors = greedy_continuations(model, tokenizer, neighbor_prompts, **plain)
    chat_answers = greedy_continuations(model, tokenizer, edited_prompts, **chatted) if chat else None
    chat_neighbors = greedy_continuations(model, tokenizer, neighbor_prompts, **chatted) if chat else None
    if unedited is None:
        references, chat_references = neighbors, chat_neighbors
    else:
        with unedited():
            references = greedy_continuations(model, tokenizer, neighbor_prompts, **plain)
            chat_references = greedy_continuations(model, tokenizer, neighbor_prompts, **chatted) if chat else None

    nan = float("nan")
    results: dict[str, float] = {}
    for kind, name in ((REWRITE, "efficacy"), (PARAPHRASE, "paraphrase")):
        selected = [i for i, item in enumerate(edited_items) if item[1] == kind]
        cases = [edited_items[i][0] for i in selected]
        targets = [edited_items[i][2] for i in selected]
        texts = [answers[i] for i in selected]
        results[f"gen_{name}_prefix"] = per_case_rate(map(starts_with_answer, texts, targets), cases)
        results[f"gen_{name}_contains"] = per_case_rate(map(contains_answer, texts, targets), cases)
        if chat:
            chat_texts = [chat_answers[i] for i in selected]
            results[f"chat_{name}_contains"] = per_case_rate(map(contains_answer, chat_texts, targets), cases)
        else:
            results[f"chat_{name}_contains"] = nan
    cases = [case for case, _ in neighbor_items]
    targets = [target for _, target in neighbor_items]
    results["gen_neighborhood_first_word"] = per_case_rate(map(_same_first_word, neighbors, references), cases)
    results["gen_neighborhood_leading_word"] = per_case_rate(map(_same_leading_word, neighbors, references), cases)
    results["gen_neighborhood_unchanged"] = per_case_rate(map(str.__eq__, neighbors, references), cases)
    results["gen_neighborhood_bleed"] = per_case_rate(map(contains_answer, neighbors, targets), cases)
    if chat:
        results["chat_neighborhood_unchanged"] = per_case_rate(map(str.__eq__, chat_neighbors, chat_references), cases)
        results["chat_neighborhood_bleed"] = per_case_rate(map(contains_answer, chat_neighbors, targets), cases)
    else:
        results["chat_neighborhood_unchanged"] = results["chat_neighborhood_bleed"] = nan
    return {key: results[key] for key in GENERATIVE_METRIC_KEYS}
