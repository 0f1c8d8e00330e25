"""The text the statistics are collected over: a user corpus (a `datasets.Dataset`, strings or text files) or, with
no corpus, text sampled from the model itself; cut into seeded token pieces under a token budget."""

import hashlib
import os
import random
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..tokenization import pad_token_id


MODEL_SAMPLES = "model-samples"
"""Corpus identity prefix of the offline source (text sampled from the model itself)."""


def _is_path(item) -> bool:
    return isinstance(item, os.PathLike) or (isinstance(item, str) and "\n" not in item and os.path.isfile(item))


def corpus_texts(corpus) -> list[str]:
    """Texts of a statistics corpus: a `datasets.Dataset` with a `text` column, a list of strings, or text file paths
    (a path string, `Path`, or a list of them; files are split into documents at blank lines).

    Raises:
        ValueError: if the corpus has no usable text.
    """
    if hasattr(corpus, "column_names"):
        if "text" not in corpus.column_names:
            raise ValueError(f"`stats_dataset` must have a `text` column, found {corpus.column_names}.")
        texts = list(corpus["text"])
    else:
        items = [corpus] if isinstance(corpus, (str, os.PathLike)) else list(corpus)
        texts = []
        for item in items:
            if _is_path(item):
                texts.extend(re.split(r"\n[ \t]*\n", Path(item).read_text(encoding="utf-8")))
            elif isinstance(item, str):
                texts.append(item)
            else:
                raise ValueError(f"`stats_dataset` items must be strings or paths, got {type(item).__name__}.")
    texts = [t.strip() for t in texts if t and t.strip()]
    if not texts:
        raise ValueError("`stats_dataset` holds no non-empty text.")
    return texts


def corpus_description(corpus) -> str:
    """A readable name of a statistics corpus for cards and logs (it does not identify the corpus: the fingerprint's
    token digest does): the file names, the dataset's name and size, or the number of texts."""
    if hasattr(corpus, "column_names"):
        info = getattr(corpus, "info", None)
        name = getattr(info, "dataset_name", None) or getattr(info, "builder_name", None) or "a datasets.Dataset"
        split = getattr(corpus, "split", None)
        return f"{name}{f' ({split})' if split else ''}, {len(corpus)} rows"
    items = [corpus] if isinstance(corpus, (str, os.PathLike)) else list(corpus)
    files = [Path(item).name for item in items if _is_path(item)]
    if files and len(files) == len(items):
        return ", ".join(files)
    return f"{len(items)} texts" if not files else f"{', '.join(files)} and {len(items) - len(files)} texts"


def text_digest(data: Iterable[str]) -> str:
    """A short SHA-256 of a sequence of strings (each terminated by a NUL byte)."""
    h = hashlib.sha256()
    for item in data:
        h.update(item.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def token_pieces(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], num_tokens: int, max_length: int, seed: int
) -> list[list[int]]:
    """Token pieces of at most `max_length` tokens, from the texts in a seeded random order, until `num_tokens`
    tokens are gathered (the last piece is cut to the budget)."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    pieces, total = [], 0
    step = 256
    for start in range(0, len(order), step):
        batch = [texts[i] for i in order[start : start + step]]
        for ids in tokenizer(batch, add_special_tokens=True)["input_ids"]:
            for offset in range(0, len(ids), max_length):
                piece = list(ids[offset : offset + max_length])[: num_tokens - total]
                if len(piece) < 2 and offset > 0:
                    continue
                pieces.append(piece)
                total += len(piece)
                if total >= num_tokens:
                    return pieces
    return pieces


@torch.no_grad()
def sample_corpus(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, num_texts: int, length: int, seed: int
) -> list[str]:
    """Offline default statistics source: `num_texts` texts of `length` tokens sampled from the model itself (top-k
    50, seeded), started from common sentence openings. Works with no corpus and no network."""
    starters = ["The", "In", "A", "It", "This", "He", "She", "We", "There", "One", "After", "When"]
    pad = pad_token_id(tokenizer)
    texts = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, num_texts, 32):
            prompts = [starters[(start + i) % len(starters)] for i in range(min(32, num_texts - start))]
            encoded = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
            width = max(len(e) for e in encoded)
            input_ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=model.device)
            mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=model.device)
            output = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                do_sample=True,
                top_k=50,
                top_p=1.0,
                temperature=1.0,
                max_new_tokens=length,
                min_new_tokens=length,
                pad_token_id=pad,
                eos_token_id=None,
            )
            texts += tokenizer.batch_decode(output, skip_special_tokens=True)
    return texts
