"""Tests of `memit_hf.evaluation.generation`: n-gram entropy, TF-IDF reference score and seeded batched sampling."""

import math

import pytest
import torch

from memit_hf.evaluation.generation import (
    TfidfVectorizer,
    consistency_texts,
    evaluate_generation,
    generate_texts,
    generation_entropy,
    ngram_entropy,
    reference_score,
    tfidf_similarity,
    word_tokenize,
)
from memit_hf.requests import EditRequest, load_requests
from memit_hf.tokenization import encode_texts


def test_word_tokenize_splits_words_clitics_and_punctuation():
    assert word_tokenize("I don't know Angola's capital, it's 3.14... well-known!") == [
        "I",
        "do",
        "n't",
        "know",
        "Angola",
        "'s",
        "capital",
        ",",
        "it",
        "'s",
        "3.14",
        "...",
        "well-known",
        "!",
    ]


def test_ngram_entropy_on_known_counts():
    # a b a b a: bigrams ab, ba, ab, ba -> two equally likely -> H2 = 1 bit; trigrams aba, bab, aba -> (2/3, 1/3).
    h3 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy(["a", "b", "a", "b", "a"]) == pytest.approx((2 / 3 * 1.0 + 4 / 3 * h3) / 2)
    assert ngram_entropy("a b a b a") == pytest.approx(1 / 3 + 2 / 3 * h3)
    # Ten distinct words: 9 distinct bigrams and 8 distinct trigrams.
    distinct = [f"w{i}" for i in range(10)]
    assert ngram_entropy(distinct) == pytest.approx(math.log2(9) / 3 + 2 * math.log2(8) / 3)
    assert ngram_entropy("the the the the the") == 0.0  # one bigram, one trigram
    assert ngram_entropy(["only", "two"]) == pytest.approx(0.0)  # one bigram (H2 = 0), no trigram
    assert ngram_entropy([]) == 0.0
    assert ngram_entropy(distinct, orders=(1,), weights=(1.0,)) == pytest.approx(math.log2(10))
    with pytest.raises(ValueError, match="equal length"):
        ngram_entropy("a b", orders=(2, 3), weights=(1.0,))


def test_generation_entropy_averages_within_then_across_cases():
    distinct = " ".join(f"w{i}" for i in range(10))
    high = math.log2(9) / 3 + 2 * math.log2(8) / 3
    # case 0: (high + 0) / 2; case 1: high; an empty case is skipped.
    value = generation_entropy([[distinct, "x x x x"], [distinct], []])
    assert value == pytest.approx(100 * (high / 2 + high) / 2)
    assert math.isnan(generation_entropy([[], []]))


def test_tfidf_matches_the_scikit_learn_formula():
    documents = ["The cat sat", "the dog sat", "a cat"]
    vectorizer = TfidfVectorizer.fit(documents)
    assert sorted(vectorizer.vocabulary) == ["cat", "dog", "sat", "the"]  # lower-cased, one-letter words dropped
    n = len(documents)
    idf = {word: math.log((1 + n) / (1 + df)) + 1 for word, df in {"cat": 2, "dog": 1, "sat": 2, "the": 2}.items()}
    for word, column in vectorizer.vocabulary.items():
        assert vectorizer.idf[column].item() == pytest.approx(idf[word])
    expected = (
        idf["the"] ** 2
        / math.sqrt(idf["the"] ** 2 + idf["cat"] ** 2)
        / math.sqrt(idf["the"] ** 2 + (2 * idf["dog"]) ** 2)
    )
    assert tfidf_similarity("the cat", "the dog dog", vectorizer) == pytest.approx(expected)
    assert tfidf_similarity("the cat", "The CAT!", vectorizer) == pytest.approx(1.0)
    assert tfidf_similarity("a zebra", "the cat", vectorizer) == 0.0  # no known word
    rows = vectorizer.transform(["cat cat sat", "unknown"])
    assert rows.shape == (2, 4) and rows.dtype == torch.float64
    assert rows[0].norm().item() == pytest.approx(1.0) and rows[1].abs().sum() == 0
    with pytest.raises(ValueError, match="no word"):
        TfidfVectorizer.fit(["a b", ""])


def test_reference_score_per_case_and_default_idf():
    generated = [["Rome is a city", "in Italy"], ["Paris bakery"], ["anything"]]
    references = [["Rome is a city in Italy"], ["Berlin wall"], []]  # the last case has no reference: skipped
    score = reference_score(generated, references)
    vectorizer = TfidfVectorizer.fit(["Rome is a city in Italy", "Berlin wall"])
    assert tfidf_similarity("Rome is a city in Italy", "Rome is a city in Italy", vectorizer) == pytest.approx(1.0)
    assert score == pytest.approx(100 * (1.0 + 0.0) / 2)
    assert math.isnan(reference_score([["x"]], [[]]))
    with pytest.raises(ValueError, match="one entry per case"):
        reference_score([["x"]], [])


def test_consistency_texts_from_attribute_prompts():
    (request,) = load_requests(
        [
            {
                "case_id": 1,
                "requested_rewrite": {
                    "prompt": "{} is located in",
                    "subject": "Angola",
                    "target_new": {"str": "Antarctica"},
                    "target_true": {"str": "Africa"},
                },
                "attribute_prompts": ["Bellingshausen Sea is in", "Vostok Station, in"],
            }
        ]
    )
    assert consistency_texts(request) == ["Bellingshausen Sea is in Antarctica", "Vostok Station, in Antarctica"]


def greedy_text(model, tokenizer, prompt, max_length):
    ids = encode_texts(tokenizer, [prompt])[0]
    with torch.no_grad():
        while len(ids) < max_length:
            ids = ids + [int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())]
    return tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_generate_texts_left_pads_and_cuts_each_row_to_max_length(model_type, tiny_tokenizer):
    from tests.testing_utils import build_tiny_causal_lm

    model = build_tiny_causal_lm(model_type, vocab_size=len(tiny_tokenizer))
    prompts = ["The capital of France is", "I", "Lionel Messi plays the sport of"]
    # top-k 1 sampling is greedy decoding: every row must equal its own unpadded greedy loop.
    texts = generate_texts(model, tiny_tokenizer, prompts, max_length=16, top_k=1, batch_size=3)
    assert texts == [greedy_text(model, tiny_tokenizer, prompt, 16) for prompt in prompts]


def test_generate_texts_is_seeded(tiny_tokenizer, tiny_llama):
    prompts = ["The capital of France is", "I think"]
    state = torch.random.get_rng_state()
    first = generate_texts(tiny_llama, tiny_tokenizer, prompts, max_length=20, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left as it was
    assert generate_texts(tiny_llama, tiny_tokenizer, prompts, max_length=20, seed=3) == first
    assert generate_texts(tiny_llama, tiny_tokenizer, prompts, max_length=20, seed=4) != first
    assert all(text.startswith(prompt) for text, prompt in zip(first, prompts))
    with pytest.raises(ValueError, match="tokens"):
        generate_texts(tiny_llama, tiny_tokenizer, ["The capital of France is"], max_length=3)
    with pytest.raises(ValueError, match="batch_size"):
        generate_texts(tiny_llama, tiny_tokenizer, prompts, batch_size=0)


def test_evaluate_generation(tiny_tokenizer, tiny_llama):
    requests = [
        EditRequest(
            prompt="{} is located in",
            subject="Big Ben",
            target_new="Rome",
            generation_prompts=["Big Ben is", "People near Big Ben speak"],
            attribute_prompts=["The Colosseum is located in"],
        ),
        EditRequest(prompt="The capital of {} is", subject="France", target_new="Berlin"),
    ]
    results = evaluate_generation(tiny_llama, tiny_tokenizer, requests, max_length=24)
    # The expected figures, by hand: every request's generation prompts (a request without any is sampled after its
    # rewrite prompt) sampled in one seeded `generate_texts` call, then GE and RS of each request's texts, with the
    # default reference texts (the attribute prompts completed with `target_new`).
    texts = generate_texts(
        tiny_llama,
        tiny_tokenizer,
        ["Big Ben is", "People near Big Ben speak", "The capital of France is"],
        max_length=24,
    )
    per_request = [texts[:2], texts[2:]]
    assert results == {
        "generation_entropy": generation_entropy(per_request),
        "reference_score": reference_score(per_request, [["The Colosseum is located in Rome"], []]),
    }
    no_references = evaluate_generation(tiny_llama, tiny_tokenizer, requests[1:], max_length=24)
    (alone,) = generate_texts(tiny_llama, tiny_tokenizer, ["The capital of France is"], max_length=24)
    assert no_references == {"generation_entropy": generation_entropy([[alone]])}
    references = [["Berlin is the capital of France"]]
    given = evaluate_generation(tiny_llama, tiny_tokenizer, requests[1:], reference_texts=references, max_length=24)
    assert given == {
        "generation_entropy": generation_entropy([[alone]]),
        "reference_score": reference_score([[alone]], references),
    }
    with pytest.raises(ValueError, match="one entry per request"):
        evaluate_generation(tiny_llama, tiny_tokenizer, requests, reference_texts=[[]])
    with pytest.raises(ValueError, match="at least one request"):
        evaluate_generation(tiny_llama, tiny_tokenizer, [])
