"""Editor: the Trainer-like entry point. It orchestrates the pipeline stages and hands the edits to its history:

requests (`requests`) -> target values z (`values`) -> second moments (`statistics`) -> per layer: keys, residuals,
the method's solve and the exact low-rank update (`updates`) -> the edit history (`history`) -> adapters (`export`)
and saved states (`editor_state`).
"""

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .algorithms import EditAlgorithm
from .architectures import get_layout
from .arguments import EditingArguments
from .callbacks import EditorCallback
from .defaults import resolve_arguments
from .distributed import process_state
from .editor_export import EditExportMixin
from .editor_state import EditorStateMixin
from .export import base_model_id
from .history import BatchRecord, EditHistory, EditOutput
from .keys import check_request_lengths, check_request_tokens, generate_context_templates
from .models import load_model_and_tokenizer, load_tokenizer_for
from .modes import eval_mode
from .requests import EDIT_RECORD_KEYS, EditRequest, check_edit_targets, load_requests
from .statistics import LayerStatistics, StatisticsProvider, model_identity
from .updates import LayerUpdates, edit_metrics, solve_layers
from .value_norms import mean_value_norm, projection_outputs
from .values import BlockRunner, ValueResult, optimise_target_values, prefix_cache_supported, with_norm_anchor


logger = logging.getLogger(__name__)

__all__ = ["EditOutput", "Editor", "EditorCallback"]


class Editor(EditExportMixin, EditorStateMixin):
    """Edit the factual knowledge of a causal LM with MEMIT, like a [`~transformers.Trainer`] trains it.

    Args:
        model (`PreTrainedModel` or `str`):
            The model to edit in place, or a model id / local path (a `.gguf` file is loaded with `gguf_file=`), loaded
            with `args.model_init_kwargs`.
        args ([`EditingArguments`], *optional*):
            Editing hyperparameters; `None` gives the defaults, and fields left at `None` get per-model defaults.
        processing_class (`PreTrainedTokenizerBase`, *optional*):
            The tokenizer. When `None` it is loaded as `pipeline` does: with the model when `model` is a string,
            else from the model's `name_or_path` (a local folder or a Hub id, offline-aware); an error says what to
            pass when neither works.
        stats_dataset (`datasets.Dataset`, `list[str]` or paths, *optional*):
            Text corpus for the key covariance. When `None`, text sampled from the model itself is used (offline).
        callbacks (`list[EditorCallback]`, *optional*):
            Objects notified at the start and end of an edit and after each layer.

    Example:

    ```python
    >>> from memit_hf import Editor, EditingArguments
    >>> editor = Editor(model, args=EditingArguments(layers=[3, 4, 5, 6, 7]), processing_class=tokenizer)
    >>> output = editor.edit([{"prompt": "{} is located in the city of", "subject": "The Eiffel Tower",
    ...                        "target_new": "Rome"}])
    >>> editor.restore()  # back to the original weights, bit for bit
    ```
    """

    def __init__(
        self,
        model: PreTrainedModel | str,
        args: EditingArguments | None = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        stats_dataset: Any = None,
        callbacks: list[EditorCallback] | None = None,
    ):
        self.args = args if args is not None else EditingArguments()
        if isinstance(model, (str, Path)):
            model, loaded_tokenizer = load_model_and_tokenizer(str(model), self.args.model_init_kwargs)
            processing_class = processing_class or loaded_tokenizer
        if not isinstance(model, PreTrainedModel):
            raise TypeError(f"`model` must be a `PreTrainedModel` or a model id/path, got {type(model).__name__}.")
        self.model = model
        self.tokenizer = processing_class if processing_class is not None else load_tokenizer_for(model)
        self.stats_dataset = stats_dataset
        self.callbacks = list(callbacks or [])
        self.layout = get_layout(
            model,
            edit_module_template=self.args.edit_module_template,
            layer_module_template=self.args.layer_module_template,
        )
        self.state = process_state()
        self.edit_history = EditHistory(model)
        """The edits the model holds ([`~memit_hf.history.EditHistory`]): batches, applied updates, method state."""
        self._statistics: StatisticsProvider | None = None
        self._statistics_key: tuple | None = None  # (StatisticsSettings, id(stats_dataset)) of `_statistics`
        self._templates: list[list[str]] | None = None
        self._base_model_info: dict[str, Any] | None = None
        self._prefix_cache_support: dict[tuple, bool] = {}  # z optimisation's KV-cache check, per layer/dtype/device

    # --------------------------------------------------------------------------------------------------- stages
    def _log(self, message: str, *values: Any) -> None:
        if self.state.is_main_process:
            logger.info(message, *values)

    @property
    def history(self) -> list[EditOutput]:
        """The outputs of the `edit()` calls the model holds (not consolidated by `keep_history`), in order."""
        return list(self.edit_history.batches)

    @property
    def resolved_args(self) -> EditingArguments:
        """`args` with every per-model default filled in."""
        return resolve_arguments(self.model, self.args, self.layout)

    @property
    def algorithm(self) -> EditAlgorithm:
        """The editing method configured by `args` (built on first use; it holds the method's state).

        Raises:
            ValueError: when `args` now name another method or configuration than the one holding state.
        """
        return self._algorithm_for(self.resolved_args)

    @algorithm.setter
    def algorithm(self, algorithm: EditAlgorithm) -> None:
        """Use `algorithm` (e.g. a subclass of a registered method) for the next edits; its name and configuration
        must be those of `args`.

        Raises:
            TypeError: if it is not an [`~memit_hf.algorithms.EditAlgorithm`].
            ValueError: if its name or configuration differ from `args`.
        """
        if not isinstance(algorithm, EditAlgorithm):
            raise TypeError(f"`algorithm` must be an `EditAlgorithm`, got {type(algorithm).__name__}.")
        args = self.resolved_args
        if algorithm.name != args.algorithm or algorithm.config.to_dict() != args.algorithm_config:
            raise ValueError(
                f"The algorithm is `{algorithm.name}` {algorithm.config.to_dict()} but `args` say `{args.algorithm}` "
                f"{args.algorithm_config}."
            )
        self.edit_history.algorithm = algorithm

    def _algorithm_for(self, args: EditingArguments) -> EditAlgorithm:
        return self.edit_history.method(args.algorithm, args.algorithm_config)

    @property
    def base_model_info(self) -> dict[str, Any]:
        """The base model's identity, as exported metadata and saved states record it: `base_model_name_or_path`,
        `base_model_revision`, `model_type`, `num_parameters`, `dtype` and `embedding_digest` (a copy)."""
        if self._base_model_info is None:
            info = model_identity(self.model)
            self._base_model_info = {
                "base_model_name_or_path": base_model_id(self.model),
                "base_model_revision": info["revision"],
                **{key: info[key] for key in ("model_type", "num_parameters", "dtype", "embedding_digest")},
            }
        return dict(self._base_model_info)

    @property
    def context_templates(self) -> list[list[str]]:
        """The seeded context templates, sampled once per editor from the unedited model."""
        if self._templates is None:
            a = self.args
            with self.unedited(), eval_mode(self.model):
                self._templates = generate_context_templates(
                    self.model,
                    self.tokenizer,
                    num_templates=a.num_context_templates,
                    length=a.context_template_length,
                    seed=a.seed,
                    chat=a.context_template_chat,
                    chat_forms=a.context_template_chat_forms,
                )
        return self._templates

    @context_templates.setter
    def context_templates(self, templates: list[list[str]]) -> None:
        """Use these context templates (e.g. those of a saved state) instead of sampling them."""
        self._templates = [list(group) for group in templates]

    @property
    def statistics(self) -> StatisticsProvider:
        """The provider of second moments for this model, tokenizer, `stats_dataset` (or `stats_repo`) and the
        `stats_*` arguments (a new one when those arguments or `stats_dataset` change)."""
        settings = self.args.statistics_settings()
        if self._statistics is None or self._statistics_key != (settings, id(self.stats_dataset)):
            self._statistics = StatisticsProvider(
                self.model, self.tokenizer, self.layout, settings, self.stats_dataset
            )
            self._statistics_key = (settings, id(self.stats_dataset))
        return self._statistics

    def get_statistics(self, layers: list[int]) -> dict[str, LayerStatistics]:
        """Second moments of the edited modules' inputs at `layers` (by module name), always of the original
        weights: from memory, the disk cache, or one pass over the corpus (see
        [`~memit_hf.statistics.StatisticsProvider`])."""
        with self.unedited():
            return self.statistics.get(layers)

    def compute_values(self, requests: Any) -> ValueResult:
        """The target values z of `requests` on the model as it is now, without editing it.

        Pass the result to [`edit`] (`edit(requests, values=...)`) to edit with them: a benchmark or sweep that edits
        the same requests under several settings computes them once.

        Args:
            requests: as in [`edit`].

        Returns:
            [`~memit_hf.values.ValueResult`]
        """
        requests = self._checked_requests(requests)
        args = self.resolved_args
        with eval_mode(self.model):
            return self._target_values(requests, self.context_templates, args.layers[-1], args)

    def _target_values(
        self, requests: list[EditRequest], templates: list[list[str]], z_layer: int, args: EditingArguments
    ) -> ValueResult:
        """The z optimisation of `requests` with the settings of `args`, its chunks shared among the processes (see
        [`~memit_hf.values.optimise_target_values`])."""
        settings = args.value_optimisation()
        if settings.use_prefix_cache:
            # Whether the KV-cache shortcut is exact depends on the architecture, dtype and device: checked once.
            key = (z_layer, self.model.dtype, str(self.model.device))
            if key not in self._prefix_cache_support:
                runner = BlockRunner(self.model, self.layout, z_layer)
                self._prefix_cache_support[key] = prefix_cache_supported(runner, self.tokenizer, requests, templates)
            settings = replace(settings, use_prefix_cache=self._prefix_cache_support[key])
        return optimise_target_values(
            self.model,
            self.tokenizer,
            self.layout,
            requests,
            templates,
            z_layer,
            settings,
            process_state=self.state,
            show_progress=self.state.is_main_process,
            prefix_cache_checked=True,
        )

    def value_norm_anchor(
        self, requests: Any, values: ValueResult | None = None, upper_quantile: float = 0.95
    ) -> float:
        """The reference norm of Norm-Anchor Scaling (`EditingArguments.v_norm_anchor`): the mean norm of the value
        vectors `v* = v0 + delta` of `requests` solved on the original model (the edits held are switched off
        meanwhile), the norms above their `upper_quantile` quantile dropped, as NAS's reference computes it over
        1,000 CounterFact requests.

        Args:
            requests: as in [`edit`] (requests of the kind to be edited; they are not edited).
            values ([`~memit_hf.values.ValueResult`], *optional*): their raw target values on the original model
                (from [`compute_values`] on an editor holding no edit and without `v_norm_anchor`), to reuse them;
                computed when `None`.
            upper_quantile (`float`, *optional*, defaults to `0.95`): the norms above this quantile are dropped.

        Returns:
            `float`: the anchor.
        """
        requests = self._checked_requests(requests)
        args = replace(self.resolved_args, v_norm_anchor=None)
        z_layer = args.layers[-1]
        with self.unedited(), eval_mode(self.model):
            if values is None:
                values = self._target_values(requests, self.context_templates, z_layer, args)
            v0 = projection_outputs(self.model, self.tokenizer, self.layout, requests, z_layer)
        return mean_value_norm(values.targets, values.initial, v0, upper_quantile)

    # ------------------------------------------------------------------------------------------------------ edit
    def edit(self, requests: Any, values: ValueResult | None = None) -> EditOutput:
        """Apply all `requests` at once, editing `self.model` in place.

        The model runs in evaluation mode (dropout off) during the edit and gets its own mode back afterwards.

        Args:
            requests (`datasets.Dataset`, `list[dict]`, `list[EditRequest]` or a JSON/JSONL path):
                Fact edits in any accepted record shape (see [`~memit_hf.requests.load_requests`]).
            values ([`~memit_hf.values.ValueResult`], *optional*):
                Target values of these requests from [`compute_values`] on the model as it is now; computed when
                `None`. With `v_norm_anchor` set, values computed without an anchor (`value_norm_ratio` is `None`)
                are anchored first, exactly as this editor's own z optimisation would anchor them.

        Returns:
            [`EditOutput`]: the deltas and metrics.

        Raises:
            ValueError: for malformed requests (naming the record and field), `values` of other requests or layer,
                non-finite target values, or an ill-conditioned solve; the weights and the method's state are then
                unchanged (bit-identical).
        """
        requests = self._checked_requests(requests)
        with eval_mode(self.model):
            return self._edit(requests, values)

    def _checked_requests(self, requests: Any) -> list[EditRequest]:
        """The normalised requests, validated (fields and tokens) before any work starts."""
        requests = load_requests(requests)
        if not requests:
            raise ValueError("`requests` is empty.")
        check_edit_targets(requests)
        check_request_tokens(self.tokenizer, requests)
        return requests

    def _edit(self, requests: list[EditRequest], values: ValueResult | None) -> EditOutput:
        """One edit in four steps: prepare (templates, statistics, checks), values, the applied updates (one
        transaction), the record in the history."""
        start, timings = time.perf_counter(), {}
        args = self.resolved_args  # resolved once per call
        algorithm = self._algorithm_for(args)
        self.edit_history.check_merge_mode(args.merge_edits)
        if args.keep_history is not None and not args.merge_edits:
            raise ValueError("`keep_history` consolidates merged edits: it needs `merge_edits=True`.")
        self._notify("on_edit_begin", requests)
        self._log("Editing %d facts at layers %s with %s.", len(requests), args.layers, args.algorithm)
        with timed(timings, "templates_seconds"):
            templates = self.context_templates
            check_request_lengths(self.tokenizer, requests, templates, self.model.config)
        with timed(timings, "statistics_seconds"):
            statistics = self._prepared_statistics(algorithm, args.layers)
        with timed(timings, "values_seconds"):
            values = self._values(requests, templates, args, values)
        with timed(timings, "update_seconds"), self.edit_history.transaction(algorithm):
            updates = solve_layers(
                self.model,
                self.tokenizer,
                self.layout,
                requests,
                templates,
                targets=values.targets.double(),
                statistics=statistics,
                algorithm=algorithm,
                layers=args.layers,
                apply=lambda delta: self.edit_history.apply(delta, args.merge_edits),
                on_layer=lambda layer, delta: self._notify("on_layer_end", layer, delta),
            )
            increments = algorithm.pending_increments()
        output = self._record(requests, values, updates, statistics, args, algorithm, timings, start)
        output.state_increments = increments
        self.edit_history.append(output, args.merge_edits, args.keep_history)
        self._notify("on_edit_end", output)
        return output

    def _notify(self, event: str, *payload: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, event)(self, *payload)

    def _prepared_statistics(self, algorithm: EditAlgorithm, layers: list[int]) -> dict[str, LayerStatistics]:
        """The statistics of `layers`, checked against the method's state and prepared (every system validated
        before any weight changes)."""
        statistics = self.get_statistics(layers)
        self.edit_history.check_statistics(algorithm, statistics)
        for layer_statistics in statistics.values():
            algorithm.prepare(layer_statistics)
        return statistics

    def _values(
        self,
        requests: list[EditRequest],
        templates: list[list[str]],
        args: EditingArguments,
        values: ValueResult | None,
    ) -> ValueResult:
        """The target values: `values` when given (checked), else the z optimisation; refused when not finite."""
        z_layer = args.layers[-1]
        if values is None:
            self._notify("on_values_begin", requests)
            values = self._target_values(requests, templates, z_layer, args)
        elif values.targets.shape[0] != len(requests) or values.z_layer not in (None, z_layer):
            raise ValueError(
                f"`values` hold {values.targets.shape[0]} requests at layer {values.z_layer}, but the edit has "
                f"{len(requests)} requests at layer {z_layer}: compute them with `compute_values(requests)`."
            )
        elif args.v_norm_anchor is not None and values.value_norm_ratio is None:
            # raw values (computed without an anchor) get this editor's Norm-Anchor Scaling, as its own z would
            values = with_norm_anchor(
                self.model, self.tokenizer, self.layout, requests, values, z_layer, args.value_optimisation()
            )
        if not torch.isfinite(values.targets).all():
            bad = (~torch.isfinite(values.targets).all(1)).nonzero().squeeze(1).tolist()
            raise ValueError(f"Target values are not finite for requests {[requests[i].record_index for i in bad]}.")
        return values

    def _record(
        self,
        requests: list[EditRequest],
        values: ValueResult,
        updates: LayerUpdates,
        statistics: dict[str, LayerStatistics],
        args: EditingArguments,
        algorithm: EditAlgorithm,
        timings: dict[str, float],
        start: float,
    ) -> EditOutput:
        """The output of a successful edit: its metrics (logged) and its record."""
        metrics = edit_metrics(values, updates, timings, time.perf_counter() - start, algorithm.diagnostics())
        self._log(
            "Edit done in %.1fs: z loss %.3f -> %.3f, %.0f%% of the target residual achieved at layer %d.",
            *(metrics[key] for key in ("total_seconds", "z_initial_loss", "z_final_loss")),
            100 * metrics["residual_achieved"],
            args.layers[-1],
        )
        hyperparameters = {k: v for k, v in args.editing_values().items() if k not in ("algorithm", "layers")}
        record = BatchRecord(
            algorithm=args.algorithm,
            layers=list(args.layers),
            num_requests=len(requests),
            hyperparameters=hyperparameters,
            statistics={name: layer_statistics.info() for name, layer_statistics in statistics.items()},
            requests=[request.to_dict(EDIT_RECORD_KEYS) for request in requests],
            metrics=dict(metrics),
        )
        return EditOutput(updates.deltas, metrics, requests, values, record, self.base_model_info)

    @torch.no_grad()
    def restore(self) -> None:
        """Return every edited module to its weights before the first `edit()`, bit for bit, and forget the edits
        (the history, the consolidated batches and the algorithm's state)."""
        self.edit_history.reset()

    @torch.no_grad()
    def rollback(self, k: int = 1) -> None:
        """Undo the last `k` edits: the weights become bit-identical to what they were before them (the original
        weights with the kept edits' deltas added again, in order), and the method's state equal to what it was (its
        accumulated key Gram replayed from the kept edits' factors). With `keep_history`, the batches it
        consolidated cannot be undone (use [`restore`]).

        Args:
            k (`int`, *optional*, defaults to 1): how many of the latest `edit()` calls to undo.

        Raises:
            ValueError: if `k` is not between 1 and the number of edits held (not consolidated).
        """
        self.edit_history.rollback(k)

    def evaluate(
        self,
        requests: Any,
        batch_size: int = 64,
        include_pre: bool = True,
        metrics: list[str] | tuple[str, ...] = ("counterfact",),
        perplexity_texts: Any = None,
        perplexity_num_tokens: int | None = None,
        reference_texts: list[list[str]] | None = None,
    ) -> dict[str, float]:
        """Evaluate the current (edited) model on `requests`, like [`~transformers.Trainer.evaluate`].

        Args:
            requests (`datasets.Dataset`, `list[dict]`, `list[EditRequest]` or a JSON/JSONL path):
                The requests (any accepted shape); CounterFact metrics need `target_true`.
            batch_size (`int`, *optional*, defaults to 64):
                Sequences per forward pass.
            include_pre (`bool`, *optional*, defaults to `True`):
                Also report the unedited model's figures under a `pre_` prefix when the model has been edited
                (computed with the original weights swapped in by [`unedited`]).
            metrics (`list[str]` or `tuple[str, ...]`, *optional*, defaults to `("counterfact",)`):
                Metric families of [`~memit_hf.evaluation.evaluate_model`]: `"counterfact"`, `"zsre"`,
                `"generation"`, `"generative"`, `"multihop"`, `"perplexity"`.
            perplexity_texts (`list[str]`, `datasets.Dataset` or text file paths, *optional*):
                Held-out corpus whose perplexity is reported (adds `"perplexity"`).
            perplexity_num_tokens (`int`, *optional*):
                Token budget of the perplexity (default: the whole corpus).
            reference_texts (`list[list[str]]`, *optional*):
                Per-request reference texts of the generation reference score.

        Returns:
            `dict[str, float]`: a flat dictionary, e.g. `efficacy_success`, `paraphrase_success`,
            `neighborhood_success`, `score` (percent) and their `pre_*` counterparts.
        """
        from .evaluation import evaluate_model

        requests = load_requests(requests)
        kwargs = dict(
            metrics=metrics,
            batch_size=batch_size,
            perplexity_texts=perplexity_texts,
            perplexity_num_tokens=perplexity_num_tokens,
            reference_texts=reference_texts,
            seed=self.args.seed,
        )
        # The generative family's neighborhood stability compares with the unedited model's continuations.
        edited = bool(self.edit_history.records())
        unedited = self.unedited if edited else None
        results = evaluate_model(self.model, self.tokenizer, requests, unedited=unedited, **kwargs)
        if include_pre and edited:
            with self.unedited():
                pre = evaluate_model(self.model, self.tokenizer, requests, **kwargs)
            results.update({f"pre_{key}": value for key, value in pre.items()})
        return results

    def unedited(self):
        """Context manager in which `self.model` temporarily computes as the original model (original weights swapped
        in, edit hooks off)."""
        return self.edit_history.applied.unedited()


@contextmanager
def timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Add the seconds the block takes to `timings[key]` (also when it raises)."""
    tick = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - tick
