"""Tests of `memit_hf.evaluation.answers`: the normalisation and word-level matching of generated answers."""

import pytest

from memit_hf.evaluation.answers import (
    answer_words,
    contains_answer,
    first_word,
    leading_word,
    normalize_answer,
    starts_with_answer,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("  The United-Kingdom.", "united kingdom"),  # article, hyphen, punctuation, outer spaces
        ("Côte d'Ivoire", "cote d ivoire"),  # accents dropped, apostrophe split
        ("«Paris»\n\n", "paris"),  # Unicode quotes, line breaks
        ("an apple", "apple"),
        ("THE  the Hague", "the hague"),  # only one leading article goes
        ("The", "the"),  # a lone article is kept: it is the whole answer
        ("a", "a"),
        ("Bank of the West", "bank of the west"),  # inner articles stay
        ("C++", "c"),  # symbols are separators
        ("Grabar-Kitarović", "grabar kitarovic"),
        ("Ｐａｒｉｓ", "paris"),  # full-width letters (compatibility decomposition)
        ("3.14", "3 14"),
        ("?!", ""),
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_answer_words():
    assert answer_words(" the Eiffel  Tower!") == ["eiffel", "tower"]
    assert answer_words("...") == []


@pytest.mark.parametrize(
    "text, answer, starts, contains",
    [
        (" Rome, Italy", "Rome", True, True),
        (" Rome", "Rome", True, True),
        (" Romeo and Juliet", "Rome", False, False),  # whole words only
        (" the city of Rome.", "Rome", False, True),
        (" the Netherlands", "Netherlands", True, True),  # leading article ignored on the text side
        (" Netherlands", "the Netherlands", True, True),  # and on the answer side
        ("\n\nANTARCTICA!", "Antarctica", True, True),  # case, line breaks, punctuation
        (" United States of America", "United States", True, True),
        (" United Kingdom", "United States", False, False),
        (" United", "United States", False, False),  # the text must hold every word of the answer
        (" Kolinda Grabar-Kitarović", "Grabar-Kitarovic", False, True),
        (" in Côte d'Ivoire", "Cote d'Ivoire", False, True),
        ("", "Rome", False, False),
        (" Rome", "?", False, False),  # an answer without words never matches
    ],
)
def test_starts_with_and_contains(text, answer, starts, contains):
    assert starts_with_answer(text, answer) is starts
    assert contains_answer(text, answer) is contains


def test_aliases_match_when_any_does():
    aliases = ["Donald Trump", "DJT", "?"]
    assert starts_with_answer(" DJT said", aliases)
    assert contains_answer("It was Donald Trump.", aliases)
    assert not contains_answer("It was Donald Duck.", aliases)
    assert not starts_with_answer(" Rome", [])


@pytest.mark.parametrize(
    "text, expected",
    [(" Paris, France", "paris"), (" the Paris of the north", "paris"), (" , ", ""), ("", ""), (" 1,000 km", "1")],
)
def test_first_word(text, expected):
    assert first_word(text) == expected


@pytest.mark.parametrize(
    "text, expected", [(" Paris, France", "paris"), (" the Paris of the north", "the"), (" A city", "a"), (" , ", "")]
)
def test_leading_word(text, expected):
    assert leading_word(text) == expected
