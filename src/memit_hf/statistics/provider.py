"""The statistics provider the Editor asks for second moments: from memory, the disk cache, or one collection pass."""

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..architectures import ModelLayout
from ..distributed import process_state
from ..modes import eval_mode
from ..settings import StatisticsSettings
from .cache import StatisticsCache
from .checkpoint import StatisticsCheckpoint, collection_key
from .collection import SecondMoment, collect_second_moments, input_dim
from .corpus import MODEL_SAMPLES, corpus_description, corpus_texts, sample_corpus, text_digest, token_pieces
from .fingerprint import fingerprint_key, statistics_fingerprint, tokenizer_digest
from .hub import fetch_statistics


logger = logging.getLogger(__name__)


@dataclass
class LayerStatistics:
    """The second moment of one edited module's input, with what identifies it.

    Args:
        module_name (`str`): the edited module.
        moment ([`SecondMoment`]): the float64 sum and token count.
        fingerprint (`dict`): everything that determined it (see [`statistics_fingerprint`]).
        key (`str`): the fingerprint's short hash (the cache key, recorded in exported metadata).
        source (`str`): where the provider got it: `"cache"`, `"collected"` (one pass over the corpus) or `"repo"`
            (`stats_repo`, fetched into the cache).
        cache ([`StatisticsCache`], *optional*): the cache holding them, where [`spectrum`] keeps what it computes.
        provenance (`dict`, *optional*): for `"repo"` statistics, where they were fetched from: `repo` (the Hub
            repository id, or the local folder's name), `revision` (the commit sha of the Hub snapshot; `None` for a
            folder) and `sha256` (of the safetensors file) (see [`~memit_hf.statistics.FetchedStatistics`]).
    """

    module_name: str
    moment: SecondMoment
    fingerprint: dict[str, Any]
    key: str
    source: str
    cache: StatisticsCache | None = field(default=None, repr=False, compare=False)
    provenance: dict[str, Any] | None = None

    @property
    def count(self) -> int:
        return self.moment.count

    def covariance(self) -> torch.Tensor:
        """E[k k^T], float64 `(d_in, d_in)`."""
        return self.moment.mean()

    def spectrum(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The eigendecomposition of [`covariance`], read from the cache when it was computed before (for these very
        statistics: the file records their checksum), else computed and written beside them.

        Returns:
            `tuple[torch.Tensor, torch.Tensor]`: eigenvalues `(d_in,)` ascending and eigenvectors `(d_in, d_in)` (as
            columns), float64.
        """
        cached = self.cache.load_spectrum(self.fingerprint) if self.cache is not None else None
        if cached is not None:
            return cached
        eigenvalues, eigenvectors = torch.linalg.eigh(self.covariance())
        if self.cache is not None:
            self.cache.save_spectrum(self.fingerprint, eigenvalues, eigenvectors)
        return eigenvalues, eigenvectors

    def info(self) -> dict[str, Any]:
        """What exported edit metadata (and a saved editor state) records about these statistics.

        Returns:
            `dict`: `key` (the fingerprint key), `corpus`, `num_tokens` and `count`; `source` (`"repo"`, `"cache"`
            or `"collected"`); and for statistics from `stats_repo` where they came from, `repo`, `revision` (the
            commit sha) and `sha256` (of the file), which are `None` for the other sources.
        """
        provenance = self.provenance or {}
        return {
            "key": self.key,
            "corpus": self.fingerprint["corpus"],
            "num_tokens": self.fingerprint["num_tokens"],
            "count": self.count,
            "source": self.source,
            "repo": provenance.get("repo"),
            "revision": provenance.get("revision"),
            "sha256": provenance.get("sha256"),
        }


class StatisticsProvider:
    """Second moments of the edited modules' inputs for one model, tokenizer and corpus.

    Statistics are looked up in memory, then in the [`StatisticsCache`], and the missing ones are collected in one
    pass over the corpus (on the model as it is when asked: the Editor asks with the original weights in place),
    checkpointed as `checkpoint_every` / `checkpoint_seconds` say and resumed from a checkpoint left by an
    interrupted run. With `repo`, they come from that Hub repository or folder instead (fetched into the cache once,
    and refused unless their fingerprint matches the model).

    Args:
        model (`PreTrainedModel`), tokenizer (`PreTrainedTokenizerBase`), layout ([`ModelLayout`]).
        settings ([`~memit_hf.settings.StatisticsSettings`]): the statistics settings (from
            [`~memit_hf.EditingArguments.statistics_settings`]).
        corpus (`datasets.Dataset`, `list[str]` or text file paths, *optional*): the statistics corpus; `None`
            samples text from the model itself (offline).

    Raises:
        TypeError: if `settings` is not a `StatisticsSettings`.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        layout: ModelLayout,
        settings: StatisticsSettings,
        corpus: Any = None,
    ):
        if not isinstance(settings, StatisticsSettings):
            raise TypeError(
                f"`settings` must be a `StatisticsSettings` (e.g. `args.statistics_settings()`), got "
                f"{type(settings).__name__}."
            )
        self.model, self.tokenizer, self.layout, self.settings, self.corpus = (
            model,
            tokenizer,
            layout,
            settings,
            corpus,
        )
        self.cache = StatisticsCache(settings.cache_dir)
        self.state = process_state()
        self._memory: dict[str, LayerStatistics] = {}
        self._pieces: list[list[int]] | None = None
        self._corpus_id: str | None = None
        self._digests: dict = {}  # tensor digests by tensor object and in-place version: see `weights_digest`
        self._repo_fingerprints: dict[str, dict[str, Any]] = {}  # by the model's fingerprint key (`stats_repo`)
        self._provenance: dict[str, dict[str, Any]] = {}  # by the fetched statistics' key (`stats_repo`)
        self.num_collections = 0
        """How many collection passes over the corpus this provider has run."""

    def corpus_pieces(self) -> list[list[int]] | None:
        """The token pieces of a user corpus (seeded order, cut to `stats_num_tokens`); `None` without a corpus (and
        with `stats_repo`, which replaces it)."""
        if self._pieces is None and self.corpus is not None and not self.settings.repo:
            a = self.settings
            texts = corpus_texts(self.corpus)
            self._pieces = token_pieces(self.tokenizer, texts, a.num_tokens, a.max_length, a.seed)
        return self._pieces

    def corpus_id(self) -> str:
        """The corpus identity in the fingerprint: a digest of the exact token pieces used, or the settings of the
        model-sampled source and a digest of the tokenizer (see [`~memit_hf.statistics.tokenizer_digest`]; the
        model's own weights are in the fingerprint already)."""
        if self._corpus_id is None:
            pieces = self.corpus_pieces()
            if self.settings.repo:
                self._corpus_id = f"stats_repo:{self.settings.repo}"  # the statistics bring their own corpus
            elif pieces is None:  # the tokenizer shapes the sampled text: its digest, not its path, identifies it
                a = self.settings
                self._corpus_id = (
                    f"{MODEL_SAMPLES}:{a.sample_texts}x{a.sample_length}:{tokenizer_digest(self.tokenizer)}"
                )
            else:
                self._corpus_id = "tokens:" + text_digest(",".join(map(str, piece)) for piece in pieces)
        return self._corpus_id

    def corpus_description(self) -> str:
        """A readable name of the corpus, stored beside the statistics for their card."""
        if self.corpus is None:
            a = self.settings
            return f"text sampled from the model itself ({a.sample_texts} texts of {a.sample_length} tokens)"
        return corpus_description(self.corpus)

    def model_fingerprints(self, layers: list[int]) -> dict[int, dict[str, Any]]:
        """The fingerprint that statistics collected now would have, for every layer: the model as it is, the corpus
        and the `stats_*` arguments."""
        return {
            layer: statistics_fingerprint(
                self.model, self.tokenizer, self.layout, layer, self.corpus_id(), self.settings, self._digests
            )
            for layer in layers
        }

    def fingerprints(self, layers: list[int]) -> dict[int, dict[str, Any]]:
        """The fingerprint of every layer's statistics for the model as it is now: those of
        [`model_fingerprints`], or with `stats_repo` those of the repository's statistics that match the model
        (fetched into the cache on first use, checked, and remembered with where they came from: see
        [`LayerStatistics.info`]). No statistics are collected; [`~memit_hf.statistics.fingerprint_key`] gives each
        one's short key.

        Raises:
            StatisticsMismatchError: with `stats_repo`, when the repository has no statistics of a layer's module
                that match the model (see [`~memit_hf.statistics.select_statistics`]), or their file is damaged or
                unsound (see [`~memit_hf.statistics.check_statistics_file`]).
        """
        fingerprints = self.model_fingerprints(layers)
        if not self.settings.repo:
            return fingerprints
        missing = {
            self.layout.edit_name(layer): fingerprint
            for layer, fingerprint in fingerprints.items()
            if fingerprint_key(fingerprint) not in self._repo_fingerprints
        }
        if missing:
            a = self.settings
            recorded = {"num_tokens": a.num_tokens, "max_length": a.max_length, "seed": a.seed}
            # Every process fetches for itself (the Hub cache locks its files, `cache.add` renames atomically), so
            # that a refusal is raised on every process rather than leaving the others at a barrier.
            dims = {module: self.input_dim(module) for module in missing}
            fetched = fetch_statistics(a.repo, missing, self.cache, recorded, a.repo_revision, a.hub_token, dims)
            for module, fingerprint in missing.items():
                self._repo_fingerprints[fingerprint_key(fingerprint)] = fetched[module].fingerprint
                self._provenance[fingerprint_key(fetched[module].fingerprint)] = fetched[module].provenance()
        return {layer: self._repo_fingerprints[fingerprint_key(fp)] for layer, fp in fingerprints.items()}

    def input_dim(self, module: str) -> int:
        """The input size `d_in` of the edited module `module` (the side of its statistics)."""
        return input_dim(self.model.get_submodule(module))

    def checkpoint(
        self, layers: list[int], fingerprints: dict[int, dict[str, Any]] | None = None
    ) -> StatisticsCheckpoint:
        """The checkpoint of a collection pass over `layers` for this process: in the cache directory, keyed by the
        layers' fingerprints and `stats_batch_tokens`, saved as `stats_checkpoint_every` and
        `stats_checkpoint_seconds` say.

        Args:
            fingerprints (`dict[int, dict]`, *optional*): the layers' fingerprints, if already computed.
        """
        fingerprints = fingerprints or self.model_fingerprints(layers)
        a = self.settings
        return StatisticsCheckpoint(
            self.cache.directory,
            collection_key([fingerprints[layer] for layer in layers], a.batch_tokens),
            every_batches=a.checkpoint_every,
            every_seconds=a.checkpoint_seconds,
            process_index=self.state.process_index,
            num_processes=self.state.num_processes,
        )

    def get(self, layers: list[int]) -> dict[str, LayerStatistics]:
        """The statistics of the edited modules at `layers`, by module name.

        Every call fingerprints the model as it is now, so statistics held in memory are handed out only while the
        weights they describe are unchanged (a model fine-tuned in place gets new ones). Collection runs the model in
        evaluation mode (dropout off) and restores its mode afterwards.
        """
        with eval_mode(self.model):
            fingerprints = self.fingerprints(layers)
            fingerprints = {
                layer: fingerprint
                for layer, fingerprint in fingerprints.items()
                if self._memory.get(self.layout.edit_name(layer)) is None
                or self._memory[self.layout.edit_name(layer)].key != fingerprint_key(fingerprint)
            }
            to_collect = []
            source = "repo" if self.settings.repo else "cache"
            for layer, fingerprint in fingerprints.items():
                name = self.layout.edit_name(layer)
                moment = self.cache.load(fingerprint, self.input_dim(name))
                if moment is None and self.settings.repo:
                    raise ValueError(
                        f"The statistics of `{name}` fetched from `stats_repo` {self.settings.repo} are damaged "
                        f"(see the warning above); delete {self.cache.paths(fingerprint)[0]} and fetch them again."
                    )
                if moment is None:
                    to_collect.append(layer)
                else:
                    key = fingerprint_key(fingerprint)
                    provenance = self._provenance.get(key) if self.settings.repo else None
                    self._memory[name] = LayerStatistics(
                        name, moment, fingerprint, key, source, self.cache, provenance
                    )
            if to_collect:
                self._collect(to_collect, fingerprints)
            return {self.layout.edit_name(layer): self._memory[self.layout.edit_name(layer)] for layer in layers}

    def _collect(self, layers: list[int], fingerprints: dict[int, dict[str, Any]]) -> None:
        pieces = self.corpus_pieces()
        if pieces is None:
            a = self.settings
            if self.state.is_main_process:
                logger.info("No `stats_dataset` given: sampling statistics text from the model itself (offline).")
            texts = sample_corpus(self.model, self.tokenizer, a.sample_texts, a.sample_length, a.seed)
            pieces = token_pieces(self.tokenizer, texts, a.num_tokens, a.max_length, a.seed)
        names = [self.layout.edit_name(layer) for layer in layers]
        checkpoint = self.checkpoint(layers, fingerprints)
        self.num_collections += 1
        moments = collect_second_moments(
            self.model,
            self.tokenizer,
            names,
            pieces,
            self.settings.batch_tokens,
            show_progress=self.state.is_main_process,
            checkpoint=checkpoint,
        )
        description = self.corpus_description()
        for layer, name in zip(layers, names):
            fingerprint = fingerprints[layer]
            if self.state.is_main_process:
                info = {"layer": layer, "dim": moments[name].total.shape[0], "corpus_description": description}
                self.cache.save(fingerprint, moments[name], info)
            self._memory[name] = LayerStatistics(
                name, moments[name], fingerprint, fingerprint_key(fingerprint), "collected", self.cache
            )
        self.state.wait_for_everyone()
        checkpoint.remove(others=self.state.is_main_process)
        if self.state.is_main_process:
            logger.info("Collected statistics for %d modules over %d tokens.", len(names), moments[names[0]].count)
