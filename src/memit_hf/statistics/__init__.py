"""Second-moment statistics `C = E[k k^T]` of the edited modules' inputs: the corpus, the fingerprint that identifies
them, the disk cache, the one-pass collection, and the provider the Editor asks."""

from .cache import StatisticsCache, default_cache_dir
from .collection import SecondMoment, add_gram, collect_second_moments, pack_batches
from .corpus import MODEL_SAMPLES, corpus_texts, sample_corpus, text_digest, token_pieces
from .fingerprint import (
    STATS_FORMAT_VERSION,
    fingerprint_key,
    model_identity,
    statistics_fingerprint,
    tensor_digest,
    upstream_parameters,
    weights_digest,
)
from .provider import LayerStatistics, StatisticsProvider


__all__ = [
    "MODEL_SAMPLES",
    "STATS_FORMAT_VERSION",
    "LayerStatistics",
    "SecondMoment",
    "StatisticsCache",
    "StatisticsProvider",
    "add_gram",
    "collect_second_moments",
    "corpus_texts",
    "default_cache_dir",
    "fingerprint_key",
    "model_identity",
    "pack_batches",
    "sample_corpus",
    "statistics_fingerprint",
    "tensor_digest",
    "text_digest",
    "token_pieces",
    "upstream_parameters",
    "weights_digest",
]
