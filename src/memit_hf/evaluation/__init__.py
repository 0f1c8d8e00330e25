"""Evaluation of edited models: the CounterFact, zsRE, generation, generative, wild, multi-hop and perplexity metric
families.

The package imports one way, leaves first:

- `scoring`: teacher-forced scoring of `(prompt, target)` pairs ([`target_nlls`], [`target_token_hits`]);
- `aggregation`: the prompt kinds and the per-case aggregation ([`per_case_mean`], [`per_case_rate`], [`harmonic_mean`]);
- `answers`: matching generated text against answers ([`normalize_answer`], [`starts_with_answer`],
  [`contains_answer`], [`first_word`]);
- `decoding`: greedy decoding, plain or through the chat template ([`greedy_continuations`], [`chat_texts`]);
- the metric families, which import only the leaves: `counterfact` ([`counterfact_scores`],
  [`evaluate_counterfact`]), `zsre` ([`zsre_scores`], [`evaluate_zsre`]), `generation` ([`generation_entropy`],
  [`reference_score`], [`evaluate_generation`]: fluency of sampled text), `generative` ([`evaluate_generative`]:
  whether greedy answers state the new object and leave the neighbors alone), `wild` ([`evaluate_wild`]: free
  answers to questions in a task context, after the WILD protocol of "The Mirage of Model Editing"), `multihop`
  ([`evaluate_multihop`]: MQuAKE multi-hop questions) and `perplexity` ([`perplexity`]);
- `families`: the read-only registry of the families (`METRIC_FAMILIES`, `EVALUATION_METRICS`) and
  [`evaluate_model`], which runs the chosen ones.

This module re-exports their public names. Note that the name `perplexity` here is the function; its module is
`memit_hf.evaluation.perplexity` in `sys.modules` (`from memit_hf.evaluation.perplexity import perplexity` works).
"""

from .aggregation import (
    NEIGHBORHOOD,
    PARAPHRASE,
    PROMPT_KINDS,
    REWRITE,
    check_groups,
    harmonic_mean,
    per_case_mean,
    per_case_rate,
)
from .answers import answer_words, contains_answer, first_word, leading_word, normalize_answer, starts_with_answer
from .counterfact import METRIC_KEYS, counterfact_scores, evaluate_counterfact
from .decoding import DEFAULT_CHAT_MESSAGE, chat_texts, greedy_continuations, has_chat_template
from .families import EVALUATION_METRICS, METRIC_FAMILIES, MetricFamily, evaluate_model
from .generation import (
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
from .generative import GENERATIVE_METRIC_KEYS, evaluate_generative
from .multihop import MULTIHOP_METRIC_KEYS, MULTIHOP_QUESTION_TEMPLATE, evaluate_multihop, multihop_cases
from .perplexity import perplexity
from .scoring import target_nlls, target_token_hits
from .wild import WILD_CONTEXT, WILD_METRIC_KEYS, answer_position, cut_answer, evaluate_wild, exact_match
from .zsre import ZSRE_METRIC_KEYS, evaluate_zsre, zsre_scores


__all__ = [
    "DEFAULT_CHAT_MESSAGE",
    "EVALUATION_METRICS",
    "GENERATIVE_METRIC_KEYS",
    "METRIC_FAMILIES",
    "METRIC_KEYS",
    "MULTIHOP_METRIC_KEYS",
    "MULTIHOP_QUESTION_TEMPLATE",
    "MetricFamily",
    "NEIGHBORHOOD",
    "NGRAM_ORDERS",
    "NGRAM_WEIGHTS",
    "PARAPHRASE",
    "PROMPT_KINDS",
    "REWRITE",
    "TfidfVectorizer",
    "WILD_CONTEXT",
    "WILD_METRIC_KEYS",
    "ZSRE_METRIC_KEYS",
    "answer_position",
    "answer_words",
    "chat_texts",
    "check_groups",
    "consistency_texts",
    "contains_answer",
    "counterfact_scores",
    "cut_answer",
    "evaluate_counterfact",
    "evaluate_generation",
    "evaluate_generative",
    "evaluate_model",
    "evaluate_multihop",
    "evaluate_wild",
    "evaluate_zsre",
    "exact_match",
    "first_word",
    "leading_word",
    "generate_texts",
    "generation_entropy",
    "greedy_continuations",
    "harmonic_mean",
    "has_chat_template",
    "multihop_cases",
    "ngram_entropy",
    "normalize_answer",
    "per_case_mean",
    "per_case_rate",
    "perplexity",
    "reference_score",
    "starts_with_answer",
    "target_nlls",
    "target_token_hits",
    "tfidf_similarity",
    "word_tokenize",
    "zsre_scores",
]
