"""Evaluation of edited models: the CounterFact, zsRE, generation and perplexity metric families.

The package imports one way, leaves first:

- `scoring`: teacher-forced scoring of `(prompt, target)` pairs ([`target_nlls`], [`target_token_hits`]);
- `aggregation`: the prompt kinds and the per-case aggregation ([`per_case_mean`], [`harmonic_mean`]);
- the metric families, which import only the leaves: `counterfact` ([`counterfact_scores`],
  [`evaluate_counterfact`]), `zsre` ([`zsre_scores`], [`evaluate_zsre`]), `generation` ([`generation_entropy`],
  [`reference_score`], [`evaluate_generation`]) and `perplexity` ([`perplexity`]);
- `families`: the read-only registry of the families (`METRIC_FAMILIES`, `EVALUATION_METRICS`) and
  [`evaluate_model`], which runs the chosen ones.

This module re-exports their public names. Note that the name `perplexity` here is the function; its module is
`memit_hf.evaluation.perplexity` in `sys.modules` (`from memit_hf.evaluation.perplexity import perplexity` works).
"""

from .aggregation import NEIGHBORHOOD, PARAPHRASE, PROMPT_KINDS, REWRITE, check_groups, harmonic_mean, per_case_mean
from .counterfact import METRIC_KEYS, counterfact_scores, evaluate_counterfact
from .families import EVALUATION_METRICS, METRIC_FAMILIES, MetricFamily, evaluate_model
from .generation import (
    GENERATION_METRIC_KEYS,
    NGRAM_ORDERS,
    NGRAM_WEIGHTS,
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
from .perplexity import perplexity
from .scoring import target_nlls, target_token_hits
from .zsre import ZSRE_METRIC_KEYS, evaluate_zsre, zsre_scores


__all__ = [
    "EVALUATION_METRICS",
    "GENERATION_METRIC_KEYS",
    "METRIC_FAMILIES",
    "METRIC_KEYS",
    "MetricFamily",
    "NEIGHBORHOOD",
    "NGRAM_ORDERS",
    "NGRAM_WEIGHTS",
    "PARAPHRASE",
    "PROMPT_KINDS",
    "REWRITE",
    "TfidfVectorizer",
    "ZSRE_METRIC_KEYS",
    "check_groups",
    "consistency_texts",
    "counterfact_scores",
    "evaluate_counterfact",
    "evaluate_generation",
    "evaluate_model",
    "evaluate_zsre",
    "generate_texts",
    "generation_entropy",
    "harmonic_mean",
    "ngram_entropy",
    "per_case_mean",
    "perplexity",
    "reference_score",
    "target_nlls",
    "target_token_hits",
    "tfidf_similarity",
    "word_tokenize",
    "zsre_scores",
]
