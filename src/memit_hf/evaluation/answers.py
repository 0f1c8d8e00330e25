"""Matching generated text against expected answers: the normalisation and the word-level tests that the generative
and multi-hop families share.

A text and an answer are compared after [`normalize_answer`]: Unicode compatibility decomposition with accents
dropped, lower case, every punctuation or symbol character turned into a space, whitespace collapsed, and one
leading article (`a`, `an`, `the`) removed. The tests then work on whole words, so `"Romeo"` never matches `"Rome"`:

- [`starts_with_answer`]: the text's words begin with the answer's words (the model says the answer first);
- [`contains_answer`]: the answer's words appear contiguously anywhere in the text (the model names the answer);
- [`first_word`]: the first word of the normalised text (the first content word: a leading article is dropped);
- [`leading_word`]: the very first word, article kept (what a reader sees first).

An answer that normalises to nothing (e.g. `"?"`) never matches. This module imports no other evaluation module.
"""

import re
import unicodedata
from collections.abc import Sequence


__all__ = [
    "ARTICLES",
    "answer_words",
    "contains_answer",
    "first_word",
    "leading_word",
    "normalize_answer",
    "starts_with_answer",
]

ARTICLES = ("a", "an", "the")
"""English articles removed from the start of a normalised text."""

_SPACES = re.compile(r"\s+")


def normalize_answer(text: str, drop_article: bool = True) -> str:
    """Normalise a text or an answer for comparison.

    The steps, in order: NFKD decomposition with combining marks removed (`"Côte"` -> `"Cote"`), lower case, every
    Unicode punctuation (`P*`) or symbol (`S*`) character replaced by a space (so `"d'Ivoire"` -> `"d ivoire"`,
    `"Grabar-Kitarović"` -> `"grabar kitarovic"`), whitespace collapsed to single spaces and stripped, and one leading
    article (`ARTICLES`) removed when other words follow it.

    Args:
        text (`str`): the text.
        drop_article (`bool`, *optional*, defaults to `True`): remove one leading article.

    Returns:
        `str`: the normalised text, e.g. `"united kingdom"` for `"  The United-Kingdom."`.
    """
    decomposed = unicodedata.normalize("NFKD", text)
    characters = []
    for character in decomposed:
        category = unicodedata.category(character)
        if category == "Mn":
            continue
        characters.append(" " if category[0] in "PS" else character)
    words = _SPACES.sub(" ", "".join(characters).lower()).strip().split(" ")
    if drop_article and len(words) > 1 and words[0] in ARTICLES:
        words = words[1:]
    return " ".join(word for word in words if word)


def answer_words(text: str) -> list[str]:
    """The words of [`normalize_answer`]`(text)` (an empty list when nothing is left)."""
    normalized = normalize_answer(text)
    return normalized.split(" ") if normalized else []


def _answer_list(answers: str | Sequence[str]) -> list[list[str]]:
    candidates = [answers] if isinstance(answers, str) else list(answers)
    return [words for words in (answer_words(answer) for answer in candidates) if words]


def starts_with_answer(text: str, answers: str | Sequence[str]) -> bool:
    """Whether the normalised `text` starts with the words of one of `answers`.

    Args:
        text (`str`): the generated text, e.g. a greedy continuation `" Antarctica, the coldest continent"`.
        answers (`str` or `Sequence[str]`): the answer, or several accepted answers (aliases).

    Returns:
        `bool`: `True` when the first words of the text are exactly the words of an answer (`"Rome, Italy"` starts
        with `"Rome"`; `"Romeo"` and `"the city of Rome"` do not).
    """
    words = answer_words(text)
    return any(words[: len(answer)] == answer for answer in _answer_list(answers))


def contains_answer(text: str, answers: str | Sequence[str]) -> bool:
    """Whether the words of one of `answers` appear contiguously in the normalised `text`.

    Args:
        text (`str`): the generated text.
        answers (`str` or `Sequence[str]`): the answer, or several accepted answers (aliases).

    Returns:
        `bool`: `True` when some answer's word sequence occurs in the text's word sequence (`"It is in the city of
        Rome."` contains `"Rome"`; `"Romeo"` does not).
    """
    words = answer_words(text)
    for answer in _answer_list(answers):
        width = len(answer)
        if any(words[start : start + width] == answer for start in range(len(words) - width + 1)):
            return True
    return False


def leading_word(text: str) -> str:
    """The very first word of the normalised `text`, a leading article kept.

    Args:
        text (`str`): the generated text.

    Returns:
        `str`: e.g. `"the"` for `" the Paris of the north"`, `"paris"` for `" Paris, France"`; `""` for a text
        without words.
    """
    words = normalize_answer(text, drop_article=False).split(" ")
    return words[0]


def first_word(text: str) -> str:
    """The first word of [`normalize_answer`]`(text)`: the first content word, a leading article dropped.

    Args:
        text (`str`): the generated text.

    Returns:
        `str`: e.g. `"paris"` for `" Paris, France"` and for `" the Paris of the north"`; `""` for a text without
        words.
    """
    words = answer_words(text)
    return words[0] if words else ""
