"""Tests of `memit_hf.evaluation.perplexity`: corpus perplexity, batched."""

import math

import pytest
import torch

from memit_hf.evaluation.perplexity import perplexity
from memit_hf.statistics.corpus import token_pieces
from tests.testing_utils import OracleLM, build_tiny_causal_lm


def reference_perplexity(model, tokenizer, pieces):
    """Each piece alone, through the model's own `labels` loss (mean NLL of tokens 1..n-1)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for piece in pieces:
            ids = torch.tensor([piece])
            total += model(input_ids=ids, labels=ids).loss.item() * (len(piece) - 1)
            count += len(piece) - 1
    return math.exp(total / count)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_perplexity_matches_a_per_piece_loop(model_type, tiny_tokenizer, corpus):
    model = build_tiny_causal_lm(model_type, vocab_size=len(tiny_tokenizer))
    texts = corpus[:10]
    pieces = token_pieces(tiny_tokenizer, texts, 10**9, 16, seed=0)
    expected = reference_perplexity(model, tiny_tokenizer, [p for p in pieces if len(p) >= 2])
    for batch_tokens in (16, 64, 4096):  # one piece per batch, a few, all at once
        value = perplexity(model, tiny_tokenizer, texts, max_length=16, batch_tokens=batch_tokens)
        assert value == pytest.approx(expected, rel=1e-5)


def test_perplexity_token_budget_and_corpus_files(tiny_tokenizer, tiny_llama, corpus, tmp_path):
    pieces = token_pieces(tiny_tokenizer, corpus, 100, 32, seed=5)
    assert sum(map(len, pieces)) == 100
    expected = reference_perplexity(tiny_llama, tiny_tokenizer, [p for p in pieces if len(p) >= 2])
    value = perplexity(tiny_llama, tiny_tokenizer, corpus, num_tokens=100, max_length=32, seed=5)
    assert value == pytest.approx(expected, rel=1e-5)
    path = tmp_path / "held_out.txt"
    path.write_text("\n\n".join(corpus))
    assert perplexity(tiny_llama, tiny_tokenizer, [path], num_tokens=100, max_length=32, seed=5) == pytest.approx(
        value, rel=1e-6
    )


def test_perplexity_closed_form(tiny_tokenizer, corpus):
    # The oracle puts a margin m on the true next token: each token's NLL is log(e^m + V - 1) - m.
    vocab, margin = len(tiny_tokenizer), 4.0
    value = perplexity(OracleLM(vocab, margin), tiny_tokenizer, corpus[:5], max_length=8, batch_tokens=32)
    assert value == pytest.approx(math.exp(math.log(math.exp(margin) + vocab - 1) - margin), rel=1e-5)


def test_perplexity_validation(tiny_tokenizer, tiny_llama):
    with pytest.raises(ValueError, match="max_length"):
        perplexity(tiny_llama, tiny_tokenizer, ["some text"], max_length=64, batch_tokens=32)
    with pytest.raises(ValueError, match="nothing to predict"):
        perplexity(tiny_llama, tiny_tokenizer, ["I"])
    with pytest.raises(ValueError, match="no non-empty text"):
        perplexity(tiny_llama, tiny_tokenizer, ["  "])
