"""The registry of metric families and [`evaluate_model`], which runs the chosen ones and merges their results.

`METRIC_FAMILIES` maps each family name to a function with the common signature
`(model, tokenizer, requests, *, batch_size, perplexity_texts, perplexity_num_tokens, reference_texts, seed, unedited)`
returning a flat `dict[str, float]`; it is a read-only mapping, fixed at import. `EVALUATION_METRICS` is the tuple of
its names, in the order in which [`evaluate_model`] runs them. [`Editor.evaluate`] calls [`evaluate_model`] on the
edited weights (passing [`Editor.unedited`] as `unedited`) and on the unedited weights.
"""

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from types import MappingProxyType
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..requests import EditRequest
from .counterfact import evaluate_counterfact
from .generation import evaluate_generation
from .generative import evaluate_generative
from .multihop import evaluate_multihop
from .perplexity import perplexity
from .wild import evaluate_wild
from .zsre import evaluate_zsre


MetricFamily = Callable[..., dict[str, float]]
"""A family runner: `(model, tokenizer, requests, **options) -> dict[str, float]`, ignoring the options it does not
use."""


def _counterfact(model, tokenizer, requests, *, batch_size: int, **_: Any) -> dict[str, float]:
    return evaluate_counterfact(model, tokenizer, requests, batch_size=batch_size)


def _zsre(model, tokenizer, requests, *, batch_size: int, **_: Any) -> dict[str, float]:
    return evaluate_zsre(model, tokenizer, requests, batch_size=batch_size)


def _generation(
    model, tokenizer, requests, *, batch_size: int, reference_texts, seed: int, **_: Any
) -> dict[str, float]:
    return evaluate_generation(
        model, tokenizer, requests, reference_texts=reference_texts, seed=seed, batch_size=batch_size
    )


def _generative(model, tokenizer, requests, *, batch_size: int, unedited, **_: Any) -> dict[str, float]:
    return evaluate_generative(model, tokenizer, requests, unedited=unedited, batch_size=batch_size)


def _wild(model, tokenizer, requests, *, batch_size: int, unedited, **_: Any) -> dict[str, float]:
    return evaluate_wild(model, tokenizer, requests, unedited=unedited, batch_size=batch_size)


def _multihop(model, tokenizer, requests, *, batch_size: int, **_: Any) -> dict[str, float]:
    return evaluate_multihop(model, tokenizer, requests, batch_size=batch_size)


def _perplexity(
    model, tokenizer, requests, *, perplexity_texts, perplexity_num_tokens, seed: int, **_: Any
) -> dict[str, float]:
    return {"perplexity": perplexity(model, tokenizer, perplexity_texts, num_tokens=perplexity_num_tokens, seed=seed)}


METRIC_FAMILIES: Mapping[str, MetricFamily] = MappingProxyType(
    {
        "counterfact": _counterfact,
        "zsre": _zsre,
        "generation": _generation,
        "generative": _generative,
        "wild": _wild,
        "multihop": _multihop,
        "perplexity": _perplexity,
    }
)
"""Family name -> runner (read-only): CounterFact probabilities ([`~memit_hf.evaluation.evaluate_counterfact`]),
zsRE token accuracy ([`~memit_hf.evaluation.evaluate_zsre`]), CounterFact generation entropy and reference score of
sampled text ([`~memit_hf.evaluation.evaluate_generation`]), greedy answers, plain and through the chat template
([`~memit_hf.evaluation.evaluate_generative`]), free answers to questions in a task context, scored by exact match
([`~memit_hf.evaluation.evaluate_wild`]), MQuAKE multi-hop questions
([`~memit_hf.evaluation.evaluate_multihop`]) and corpus perplexity ([`~memit_hf.evaluation.perplexity`])."""

EVALUATION_METRICS = tuple(METRIC_FAMILIES)
"""The metric families [`evaluate_model`] runs, in its order: `("counterfact", "zsre", "generation", "generative",
"wild", "multihop", "perplexity")`."""


def evaluate_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: list[EditRequest],
    metrics: Sequence[str] = ("counterfact",),
    batch_size: int = 64,
    perplexity_texts: Any = None,
    perplexity_num_tokens: int | None = None,
    reference_texts: Sequence[Sequence[str]] | None = None,
    seed: int = 0,
    unedited: Callable[[], AbstractContextManager] | None = None,
) -> dict[str, float]:
    """Run the chosen metric families on `model` and merge their results into one flat dictionary (percentages,
    except `generation_entropy` and `perplexity`).

    The families run in the order of `EVALUATION_METRICS`, whatever the order of `metrics`.

    Args:
        model (`PreTrainedModel`):
            The causal language model, as it is now (edited or not).
        tokenizer (`PreTrainedTokenizerBase`):
            The model's tokenizer.
        requests (`list[EditRequest]`):
            The requests whose prompts are scored.
        metrics (`Sequence[str]`, *optional*, defaults to `("counterfact",)`):
            Families from `EVALUATION_METRICS` (or one name). `"perplexity"` is added when `perplexity_texts` is
            given.
        batch_size (`int`, *optional*, defaults to 64):
            Sequences per forward pass (prompts per `generate` call for `"generation"`, `"generative"`, `"wild"`
            and `"multihop"`).
        perplexity_texts (`list[str]`, `datasets.Dataset` or text file paths, *optional*):
            Held-out corpus for `"perplexity"`.
        perplexity_num_tokens (`int`, *optional*):
            Token budget of the perplexity (default: the whole corpus).
        reference_texts (`Sequence[Sequence[str]]`, *optional*):
            Per-request reference texts of the reference score (see
            [`~memit_hf.evaluation.evaluate_generation`]).
        seed (`int`, *optional*, defaults to 0):
            Seed of the sampled generations and of the perplexity's text order.
        unedited (`Callable[[], AbstractContextManager]`, *optional*):
            A factory of context managers inside which `model` has its unedited weights (e.g.
            [`~memit_hf.Editor.unedited`]): the reference of the `"generative"` and `"wild"` neighborhood stability. By default
            the model as it is is its own reference.

    Returns:
        `dict[str, float]`: the union of the families' keys: `METRIC_KEYS`, `ZSRE_METRIC_KEYS`, `generation_entropy`
        (and `reference_score`), `GENERATIVE_METRIC_KEYS`, `WILD_METRIC_KEYS`, `MULTIHOP_METRIC_KEYS`, `perplexity`.

    Raises:
        ValueError: for an unknown family, or `"perplexity"` without `perplexity_texts`.
    """
    chosen = list(dict.fromkeys([metrics] if isinstance(metrics, str) else metrics))
    if perplexity_texts is not None and "perplexity" not in chosen:
        chosen.append("perplexity")
    unknown = [name for name in chosen if name not in METRIC_FAMILIES]
    if unknown:
        raise ValueError(f"Unknown metrics {unknown}; choose from {EVALUATION_METRICS}.")
    if "perplexity" in chosen and perplexity_texts is None:
        raise ValueError("`metrics` has `perplexity` but no `perplexity_texts` was given.")
    options = dict(
        batch_size=batch_size,
        perplexity_texts=perplexity_texts,
        perplexity_num_tokens=perplexity_num_tokens,
        reference_texts=reference_texts,
        seed=seed,
        unedited=unedited,
    )
    results: dict[str, float] = {}
    for name in EVALUATION_METRICS:
        if name in chosen:
            results.update(METRIC_FAMILIES[name](model, tokenizer, requests, **options))
    return results
