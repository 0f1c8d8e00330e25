"""Tokenisation helpers shared by the key, value and evaluation stages.

Everything is encoded jointly and padded by hand, so results do not depend on the tokenizer's padding side, on whether
it adds a BOS token, or on SentencePiece's handling of leading spaces (algorithm.md section 1.3).
"""

import torch
from transformers import PreTrainedTokenizerBase


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id used to pad batches: the tokenizer's pad token, else its EOS token, else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def encode_texts(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Encode full prompts with the tokenizer's special tokens (BOS where it adds one), unpadded and untruncated."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=True)["input_ids"]]


def encode_targets(
    tokenizer: PreTrainedTokenizerBase, targets: list[str], leading_space: bool = True
) -> list[list[int]]:
    """Encode edit targets as continuations: a leading space is added (as the reference does; `leading_space=False`
    strips it instead, for a target that opens a line such as a chat answer) and no special tokens.

    SentencePiece tokenizers that turn the leading space into a lone `▁` token get that token dropped, so the first
    id is the word itself (algorithm.md section 1.2).
    """
    if not targets:
        return []
    spaced = [(t if t.startswith(" ") else " " + t) if leading_space else t.lstrip() for t in targets]
    encoded = tokenizer(spaced, add_special_tokens=False)["input_ids"]
    result = []
    for ids in encoded:
        ids = list(ids)
        if len(ids) > 1 and tokenizer.decode(ids[:1]).strip() == "":
            ids = ids[1:]
        result.append(ids)
    return result


def last_token_indices(tokenizer: PreTrainedTokenizerBase, texts: list[str], char_ends: list[int]) -> list[int]:
    """Index of the token holding character `char_ends[i] - 1` of `texts[i]`, counted in the joint encoding.

    The prefix `texts[i][:char_ends[i]]` is encoded with the same special tokens as the full text; its length minus
    one is the index of its last token (the AlphaEdit-style joint encoding, which counts BOS once and respects merges
    at the prefix/subject boundary).
    """
    prefixes = [text[:end] for text, end in zip(texts, char_ends)]
    return [len(ids) - 1 for ids in encode_texts(tokenizer, prefixes)]


def pad_batch(sequences: list[list[int]], pad_id: int, device: torch.device | str | None = None) -> tuple:
    """Right-pad token id lists into `(input_ids, attention_mask)` tensors of shape `(batch, max_len)`."""
    max_len = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), max_len), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), max_len), dtype=torch.long)
    lengths = torch.tensor([len(s) for s in sequences])
    flat = torch.tensor([t for s in sequences for t in s], dtype=torch.long)
    positions = torch.arange(max_len).expand(len(sequences), max_len)
    mask = positions < lengths[:, None]
    input_ids[mask] = flat
    attention_mask[mask] = 1
    if device is not None:
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    return input_ids, attention_mask
