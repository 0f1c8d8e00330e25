"""Second-moment statistics `C = E[k k^T]` of the edited modules' inputs: the corpus, the fingerprint that identifies
them, the disk cache, the one-pass collection with its resumable checkpoints, sharing through the Hub, and the
provider the Editor asks."""

from .cache import StatisticsCache, default_cache_dir, entry_name
from .checkpoint import CollectionProgress, StatisticsCheckpoint, collection_key
from .collection import CollectionInterrupted, SecondMoment, collect_second_moments, pack_batches
from .corpus import MODEL_SAMPLES, corpus_description, corpus_texts, sample_corpus, text_digest, token_pieces
from .files import (
    LOCK_SUFFIX,
    STALE_TEMPORARY_SECONDS,
    TEMPORARY_MARKER,
    entry_lock,
    host_name,
    new_file_mode,
    process_alive,
    remove_stale_temporary_files,
    save_tensors,
    temporary_folder,
    temporary_owner,
    temporary_path,
)
from .fingerprint import (
    MODEL_FIELDS,
    STATS_FORMAT_VERSION,
    fingerprint_differences,
    fingerprint_key,
    model_identity,
    statistics_fingerprint,
    tensor_digest,
    upstream_parameters,
    weights_digest,
)
from .gram import GRAM_BLOCKS, add_gram, gram_edges, mirror_gram
from .hub import (
    STATISTICS_REPO_TYPE,
    StatisticsEntry,
    StatisticsMismatchError,
    build_statistics_card,
    fetch_statistics,
    push_statistics,
    select_statistics,
    statistics_entries,
)
from .provider import LayerStatistics, StatisticsProvider


__all__ = [
    "GRAM_BLOCKS",
    "LOCK_SUFFIX",
    "MODEL_FIELDS",
    "MODEL_SAMPLES",
    "STALE_TEMPORARY_SECONDS",
    "STATISTICS_REPO_TYPE",
    "STATS_FORMAT_VERSION",
    "TEMPORARY_MARKER",
    "CollectionInterrupted",
    "CollectionProgress",
    "LayerStatistics",
    "SecondMoment",
    "StatisticsCache",
    "StatisticsCheckpoint",
    "StatisticsEntry",
    "StatisticsMismatchError",
    "StatisticsProvider",
    "add_gram",
    "build_statistics_card",
    "collect_second_moments",
    "collection_key",
    "corpus_description",
    "corpus_texts",
    "default_cache_dir",
    "entry_lock",
    "entry_name",
    "fetch_statistics",
    "fingerprint_differences",
    "fingerprint_key",
    "gram_edges",
    "host_name",
    "mirror_gram",
    "model_identity",
    "new_file_mode",
    "pack_batches",
    "process_alive",
    "push_statistics",
    "remove_stale_temporary_files",
    "sample_corpus",
    "save_tensors",
    "select_statistics",
    "statistics_entries",
    "statistics_fingerprint",
    "temporary_folder",
    "temporary_owner",
    "temporary_path",
    "tensor_digest",
    "text_digest",
    "token_pieces",
    "upstream_parameters",
    "weights_digest",
]
