"""CounterFact generation tests (algorithm.md section 8.2): generation entropy (GE) and reference score (RS).

Both score free text sampled from the model after each case's generation prompts ([`generate_texts`]: top-k 5, 100
tokens in total, prompt included, seeded, batched with `model.generate`).

- **GE** ([`ngram_entropy`], [`generation_entropy`]): for each text, the entropies (bits) of its word 2-gram and
  3-gram frequency distributions, weighted 2/3 and 4/3 and averaged (so `H2 / 3 + 2 * H3 / 3`); averaged over a
  case's texts, then over cases, times 100. Low values mean repetitive text.
- **RS** ([`tfidf_similarity`], [`reference_score`]): the cosine between the TF-IDF vectors of a case's joined
  generations and its joined reference texts, averaged over cases, times 100.

Differences from the reference harness, all documented where they apply:

- Words come from [`word_tokenize`], a Treebank-style regular expression, instead of NLTK's `word_tokenize` (NLTK
  is not a dependency and needs a model download); on ordinary prose the two split words and punctuation alike.
- The reference compares generations with Wikipedia snippets about other subjects that hold the same relation and
  new object, with an IDF fitted on all snippets. The snippets are not shipped, so by default the reference texts of
  a request are its CounterFact `attribute_prompts` completed with `target_new` ([`consistency_texts`]: other
  subjects that hold the new object, the nearest shipped stand-in), and the IDF is fitted on the reference texts of
  the evaluated requests. Pass real snippets as `reference_texts` to get the paper's RS. Absolute values are not
  comparable to the paper's.
- Sampling is seeded; the reference's is not.
"""

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..requests import EditRequest
from ..tokenization import encode_texts, pad_token_id
from .aggregation import per_case_mean


NGRAM_ORDERS = (2, 3)
NGRAM_WEIGHTS = (2 / 3, 4 / 3)
"""The reference's n-gram orders and weights of the generation entropy."""

_WORD_PATTERN = re.compile(
    r"""
    [A-Za-z]+(?=n't\b)            # "do" of "don't"
    | n't\b                       # its clitic
    | '(?:s|re|ve|ll|d|m)\b       # other English clitics: "'s", "'re", ...
    | \d+(?:[.,]\d+)*             # numbers, "3.14", "1,000"
    | \w+(?:-\w+)*                # words, with inner hyphens
    | \.\.\.                      # ellipsis
    | \S                          # any other non-space character on its own
    """,
    re.VERBOSE,
)
_TFIDF_PATTERN = re.compile(r"(?u)\b\w\w+\b")


def word_tokenize(text: str) -> list[str]:
    """Split `text` into words, numbers, English clitics and punctuation, like NLTK's Treebank word tokenizer.

    Args:
        text (`str`): the text.

    Returns:
        `list[str]`: the tokens, e.g. `["I", "do", "n't", "know", "Angola", "'s", "capital", "."]` for
        `"I don't know Angola's capital."`.
    """
    return _WORD_PATTERN.findall(text)


def ngram_entropy(
    text: str | Sequence[str],
    orders: Sequence[int] = NGRAM_ORDERS,
    weights: Sequence[float] = NGRAM_WEIGHTS,
) -> float:
    """Weighted n-gram entropy of one text, in bits, as the reference's `compute_n_gram_entropy`.

    For each order `n`, `H_n = -sum_g f_g log2 f_g` over the relative frequencies `f_g` of the text's n-grams (0 when
    the text has fewer than `n` tokens); the result is the arithmetic mean of `weights[i] * H_{orders[i]}`.

    Args:
        text (`str` or `Sequence[str]`):
            A text (split by [`word_tokenize`]) or its tokens.
        orders (`Sequence[int]`, *optional*, defaults to `(2, 3)`):
            The n-gram orders.
        weights (`Sequence[float]`, *optional*, defaults to `(2/3, 4/3)`):
            One weight per order.

    Returns:
        `float`: the weighted mean entropy in bits (`H2 / 3 + 2 * H3 / 3` with the defaults).

    Raises:
        ValueError: when `orders` and `weights` differ in length or are empty.
    """
    if len(orders) != len(weights) or not orders:
        raise ValueError(f"`orders` and `weights` must be non-empty and of equal length (got {orders}, {weights}).")
    tokens = word_tokenize(text) if isinstance(text, str) else list(text)
    weighted = []
    for n, weight in zip(orders, weights):
        counts = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
        total = sum(counts.values())
        entropy = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        weighted.append(weight * entropy)
    return sum(weighted) / len(weighted)


def generation_entropy(texts: Sequence[Sequence[str]]) -> float:
    """GE: [`ngram_entropy`] averaged over each case's texts, then over cases, times 100.

    Args:
        texts (`Sequence[Sequence[str]]`):
            For each case, its generated texts (cases without text are skipped).

    Returns:
        `float`: the generation entropy (e.g. about 620 for fluent GPT-J text), NaN when there is no text.
    """
    values, cases = [], []
    for case, case_texts in enumerate(texts):
        for text in case_texts:
            values.append(ngram_entropy(text))
            cases.append(case)
    return per_case_mean(values, cases) * 100.0


@dataclass
class TfidfVectorizer:
    """A TF-IDF model with scikit-learn's `TfidfVectorizer` defaults: lower-cased words of two or more word
    characters, smooth IDF `ln((1 + n) / (1 + df)) + 1`, raw counts times IDF, L2-normalised rows.

    Args:
        vocabulary (`dict[str, int]`): word -> column.
        idf (`torch.Tensor` of shape `(len(vocabulary),)`): the IDF of each column (float64).
    """

    vocabulary: dict[str, int]
    idf: torch.Tensor

    @classmethod
    def fit(cls, documents: Sequence[str]) -> "TfidfVectorizer":
        """Fit the vocabulary and IDF on `documents` (words outside them are ignored by [`transform`]).

        Raises:
            ValueError: when the documents hold no word.
        """
        frequencies: Counter = Counter()
        for document in documents:
            frequencies.update(set(_TFIDF_PATTERN.findall(document.lower())))
        if not frequencies:
            raise ValueError("The TF-IDF documents hold no word of two or more characters.")
        words = sorted(frequencies)
        df = torch.tensor([frequencies[word] for word in words], dtype=torch.float64)
        idf = torch.log((1 + len(documents)) / (1 + df)) + 1
        return cls({word: i for i, word in enumerate(words)}, idf)

    def transform(self, texts: Sequence[str]) -> torch.Tensor:
        """The L2-normalised TF-IDF vectors of `texts`, shape `(len(texts), len(vocabulary))`, float64 (a text with
        no known word gets a zero row)."""
        rows = torch.zeros(len(texts), len(self.vocabulary), dtype=torch.float64)
        for row, text in enumerate(texts):
            for word, count in Counter(_TFIDF_PATTERN.findall(text.lower())).items():
                column = self.vocabulary.get(word)
                if column is not None:
                    rows[row, column] = count
        rows *= self.idf
        return rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-300)


def tfidf_similarity(text_a: str, text_b: str, vectorizer: TfidfVectorizer) -> float:
    """Cosine similarity of the TF-IDF vectors of two texts (0 when either has no known word)."""
    vectors = vectorizer.transform([text_a, text_b])
    return float(vectors[0] @ vectors[1])


def reference_score(
    generated: Sequence[Sequence[str]],
    references: Sequence[Sequence[str]],
    vectorizer: TfidfVectorizer | None = None,
) -> float:
    """RS: per case, the TF-IDF cosine of its space-joined generations and its space-joined reference texts;
    averaged over the cases that have both, times 100.

    Args:
        generated (`Sequence[Sequence[str]]`):
            For each case, its generated texts.
        references (`Sequence[Sequence[str]]`):
            For each case, its reference texts (e.g. [`consistency_texts`] or Wikipedia snippets).
        vectorizer ([`TfidfVectorizer`], *optional*):
            The TF-IDF model; by default fitted on every reference text of every case, each one a document.

    Returns:
        `float`: the reference score in [0, 100], NaN when no case has both generations and references.

    Raises:
        ValueError: when `generated` and `references` differ in length.
    """
    if len(generated) != len(references):
        raise ValueError(
            f"`generated` and `references` must have one entry per case (got {len(generated)} and {len(references)})."
        )
    pairs = [(i, " ".join(g), " ".join(r)) for i, (g, r) in enumerate(zip(generated, references)) if g and r]
    if not pairs:
        return math.nan
    if vectorizer is None:
        vectorizer = TfidfVectorizer.fit([text for case in references for text in case])
    cases: list[Hashable] = [i for i, _, _ in pairs]
    values = [tfidf_similarity(gen, ref, vectorizer) for _, gen, ref in pairs]
    return per_case_mean(values, cases) * 100.0


def consistency_texts(request: EditRequest) -> list[str]:
    """Default reference texts of a request for RS: each of its `attribute_prompts` followed by `target_new`
    (statements about other subjects that hold the new object), e.g. `"Bellingshausen Sea is in Antarctica"`."""
    return [f"{prompt} {request.target_new}" for prompt in request.attribute_prompts]


@torch.no_grad()
def generate_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_length: int = 100,
    top_k: int = 5,
    seed: int = 0,
    batch_size: int = 32,
) -> list[str]:
    """Sample one continuation per prompt, as the reference's `generate_fast`: top-k sampling (temperature 1) up to
    `max_length` tokens in total, prompt included, without stopping at EOS; the decoded texts include the prompt.

    Prompts are left-padded and sampled together with `model.generate`, `batch_size` at a time; each row is cut to
    `max_length` tokens. Sampling is seeded: the same call gives the same texts (the global RNG is restored after).

    Args:
        model (`PreTrainedModel`): the causal language model.
        tokenizer (`PreTrainedTokenizerBase`): its tokenizer.
        prompts (`Sequence[str]`): the prompts.
        max_length (`int`, *optional*, defaults to 100): total tokens of each text, prompt (and BOS) included.
        top_k (`int`, *optional*, defaults to 5): the sampling's top-k.
        seed (`int`, *optional*, defaults to 0): the sampling seed.
        batch_size (`int`, *optional*, defaults to 32): prompts per `generate` call.

    Returns:
        `list[str]`: one text per prompt (prompt and continuation, special tokens removed, NFKD-normalised, blank
        lines turned into spaces as in the reference).

    Raises:
        ValueError: when `batch_size` is not positive or a prompt is not shorter than `max_length` tokens.
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer (got {batch_size}).")
    encoded = encode_texts(tokenizer, list(prompts))
    for prompt, ids in zip(prompts, encoded):
        if not 0 < len(ids) < max_length:
            raise ValueError(f"The prompt {prompt!r} has {len(ids)} tokens; it must have 1 to {max_length - 1}.")
    pad = pad_token_id(tokenizer)
    device = model.device
    texts: list[str] = []
    was_training = model.training
    model.eval()
    devices = (
        [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    )
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for start in range(0, len(encoded), batch_size):
                batch = encoded[start : start + batch_size]
                width = max(len(ids) for ids in batch)
                input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=device)
                mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device)
                new_tokens = max_length - min(len(ids) for ids in batch)
                # Explicit values override the model's own generation defaults (temperature, top-p, repetition
                # penalty), so this is the reference's plain top-k sampling; `eos_token_id=None` never stops early.
                output = model.generate(
                    input_ids=input_ids,
                    attention_mask=mask,
                    do_sample=True,
                    top_k=top_k,
                    top_p=1.0,
                    temperature=1.0,
                    repetition_penalty=1.0,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    pad_token_id=pad,
                    eos_token_id=None,
                )
                for row, ids in enumerate(batch):
                    keep = output[row, width : width + max_length - len(ids)].tolist()
                    text = tokenizer.decode(ids + keep, skip_special_tokens=True)
                    texts.append(unicodedata.normalize("NFKD", text).replace("\n\n", " "))
    finally:
        model.train(was_training)
    return texts


def evaluate_generation(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: list[EditRequest],
    reference_texts: Sequence[Sequence[str]] | None = None,
    max_length: int = 100,
    seed: int = 0,
    batch_size: int = 32,
) -> dict[str, float]:
    """Run the CounterFact generation tests (GE and RS) for `requests` on `model`.

    Each request's `generation_prompts` (or, when it has none, its rewrite prompt `request.text`) are sampled once
    each with [`generate_texts`], all requests together.

    Args:
        model (`PreTrainedModel`):
            The (edited) causal language model.
        tokenizer (`PreTrainedTokenizerBase`):
            The model's tokenizer.
        requests (`list[EditRequest]`):
            The requests.
        reference_texts (`Sequence[Sequence[str]]`, *optional*):
            Reference texts of each request for RS (e.g. Wikipedia snippets about other subjects with the same
            relation and new object). By default [`consistency_texts`] of each request.
        max_length (`int`, *optional*, defaults to 100):
            Total tokens of each generated text, prompt included.
        seed (`int`, *optional*, defaults to 0):
            The sampling seed.
        batch_size (`int`, *optional*, defaults to 32):
            Prompts per `generate` call.

    Returns:
        `dict[str, float]`: `generation_entropy` (GE), and `reference_score` (RS) when some request has reference
        texts.

    Raises:
        ValueError: when `requests` is empty or `reference_texts` has not one entry per request.
    """
    if not requests:
        raise ValueError("`evaluate_generation` needs at least one request.")
    if reference_texts is None:
        reference_texts = [consistency_texts(request) for request in requests]
    elif len(reference_texts) != len(requests):
        raise ValueError(
            f"`reference_texts` must have one entry per request (got {len(reference_texts)} for {len(requests)})."
        )
    prompts, owners = [], []
    for case, request in enumerate(requests):
        for prompt in request.generation_prompts or [request.text]:
            prompts.append(prompt)
            owners.append(case)
    texts = generate_texts(model, tokenizer, prompts, max_length=max_length, seed=seed, batch_size=batch_size)
    generated: list[list[str]] = [[] for _ in requests]
    for case, text in zip(owners, texts):
        generated[case].append(text)
    results = {"generation_entropy": generation_entropy(generated)}
    if any(reference_texts):
        results["reference_score"] = reference_score(generated, reference_texts)
    return results
