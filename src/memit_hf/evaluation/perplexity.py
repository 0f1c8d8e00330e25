"""General capability: perplexity of the model on a held-out text corpus, to compare before and after an edit."""

import math
import sys
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..statistics.corpus import corpus_texts, token_pieces
from ..tokenization import pad_batch, pad_token_id


@torch.no_grad()
def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Any,
    num_tokens: int | None = None,
    max_length: int = 512,
    batch_tokens: int = 2048,
    seed: int = 0,
) -> float:
    """Perplexity `exp(mean NLL)` of `model` on a text corpus, every token predicted from the tokens before it.

    The texts are encoded with the tokenizer's special tokens and cut into pieces of at most `max_length` tokens
    (non-overlapping windows: the first token of each piece is context only). With a `num_tokens` budget the pieces
    come from the texts in a seeded random order until the budget is reached, as for the covariance statistics.
    Pieces are sorted by length and right-padded into batches of at most `batch_tokens` padded tokens, one forward
    pass each; the NLL is summed in float64 over every predicted token. The model is in eval mode during the call
    and its previous mode is restored.

    Args:
        model (`PreTrainedModel`):
            A causal language model returning `logits`.
        tokenizer (`PreTrainedTokenizerBase`):
            The model's tokenizer.
        texts (`list[str]`, `datasets.Dataset` with a `text` column, or text file paths):
            The corpus; files are split into documents at blank lines.
        num_tokens (`int`, *optional*):
            Token budget; `None` uses every token of `texts` (in their seeded random order).
        max_length (`int`, *optional*, defaults to 512):
            Maximum tokens per piece.
        batch_tokens (`int`, *optional*, defaults to 2048):
            Maximum padded tokens per forward pass.
        seed (`int`, *optional*, defaults to 0):
            Seed of the order in which texts are drawn.

    Returns:
        `float`: the perplexity.

    Raises:
        ValueError: when a size is not positive, `batch_tokens < max_length`, or the corpus has no token to predict.
    """
    if max_length < 2 or batch_tokens < max_length or (num_tokens is not None and num_tokens < 2):
        raise ValueError(
            f"Need `max_length` >= 2, `batch_tokens` >= `max_length` and `num_tokens` >= 2 or None (got {max_length}, "
            f"{batch_tokens}, {num_tokens})."
        )
    documents = corpus_texts(texts)
    budget = num_tokens if num_tokens is not None else sys.maxsize
    pieces = [piece for piece in token_pieces(tokenizer, documents, budget, max_length, seed) if len(piece) >= 2]
    if not pieces:
        raise ValueError("The corpus has no piece of two or more tokens; there is nothing to predict.")
    pieces.sort(key=len, reverse=True)
    pad = pad_token_id(tokenizer)
    total_nll = torch.zeros((), dtype=torch.float64)
    total_tokens = 0
    was_training = model.training
    model.eval()
    try:
        start = 0
        while start < len(pieces):
            rows = max(1, batch_tokens // len(pieces[start]))
            batch = pieces[start : start + rows]
            start += rows
            input_ids, attention_mask = pad_batch(batch, pad, device=model.device)
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
            labels = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).to(torch.promote_types(logits.dtype, torch.float32)),
                labels.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
            total_nll += nll.double().cpu()
            total_tokens += int((labels != -100).sum())
    finally:
        model.train(was_training)
    return math.exp(float(total_nll) / total_tokens)
