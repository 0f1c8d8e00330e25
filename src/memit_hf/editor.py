"""Editor: the Trainer-like entry point. It wires the pipeline stages and keeps the edit history:

requests (`requests`) -> target values z (`values`) -> second moments (`statistics`) -> per layer: keys (`keys`),
residuals, the method's solve (`algorithms`) and the exact low-rank update (`deltas`) -> adapters (`export`).
"""

import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .algorithms import EditAlgorithm, LayerProblem, get_algorithm
from .architectures import get_layout, resolve_arguments
from .arguments import EditingArguments
from .deltas import AppliedEdits, LayerDelta, make_delta, merged_weight
from .distributed import process_state
from .editor_state import (
    BATCH_ADAPTERS_DIR,
    EditorState,
    HistoryFloor,
    SavedBatch,
    StateMismatchError,
    check_model,
    check_state_content,
    check_statistics,
    read_state,
    write_state,
)
from .export import (
    ExportReport,
    base_model_id,
    check_output_dir,
    edit_metadata,
    prepare_deltas,
    save_adapter_files,
    save_merged_checkpoint,
    write_edit_adapter,
)
from .hub import push_folder
from .keys import check_request_lengths, check_request_tokens, compute_keys_and_outputs, generate_context_templates
from .models import load_model_and_tokenizer, load_tokenizer_for
from .modes import eval_mode
from .norms import rms_norm_residuals
from .requests import EDIT_RECORD_KEYS, EditRequest, check_edit_targets, load_requests
from .statistics import LayerStatistics, StatisticsProvider, fingerprint_key, model_identity, tensor_digest
from .values import ValueResult, optimise_target_values
from .weights import read_parameter


logger = logging.getLogger(__name__)

VALUE_FIELDS = ("targets", "initial", "initial_loss", "final_loss", "final_nll", "steps", "final_margin")
"""The per-request tensors of a [`~memit_hf.values.ValueResult`]."""


class EditorCallback:
    """Base class for callbacks of [`Editor`]; override the events you need (all receive the editor)."""

    def on_edit_begin(self, editor: "Editor", requests: list[EditRequest]) -> None:
        pass

    def on_values_begin(self, editor: "Editor", requests: list[EditRequest]) -> None:
        """Called when the z optimisation starts (after statistics and validation; not when `values` are given)."""

    def on_layer_end(self, editor: "Editor", layer: int, delta: LayerDelta) -> None:
        pass

    def on_edit_end(self, editor: "Editor", output: "EditOutput") -> None:
        pass


@dataclass
class EditOutput:
    """What [`Editor.edit`] returns.

    Args:
        deltas (`list[LayerDelta]`): the update of every edited module, as exact low-rank factors.
        metrics (`dict[str, float]`): timings per stage (`*_seconds`), z losses, counts and the residual diagnostic
            `residual_achieved` (fraction of the target residual at the last edited layer the update delivers).
        requests (`list[EditRequest]`): the normalised requests.
        values (`ValueResult`): per-request z optimisation results.
        metadata (`dict`): what an exported adapter records about this edit (see [`~memit_hf.export.edit_metadata`]):
            the base model, algorithm, layers, hyperparameters, statistics fingerprints and requests.
    """

    deltas: list[LayerDelta]
    metrics: dict[str, float]
    requests: list[EditRequest]
    values: ValueResult | None = field(default=None, repr=False)
    metadata: dict[str, Any] = field(default_factory=dict, repr=False)
    state_increments: list = field(default_factory=list, repr=False)
    """The Gram factors this edit added to the method's state (see [`~memit_hf.algorithms.EditAlgorithm.replay`])."""

    def save_adapter(
        self,
        path: str | Path,
        export_rank: int | float | None = None,
        base_model_name_or_path: str | None = None,
        include_requests: bool = True,
    ) -> ExportReport:
        """Write this edit alone as a peft LoRA adapter (see [`Editor.save_adapter`] for the arguments)."""
        metadata = edit_metadata(self.metadata["model"], [self.metadata["batch"]], include_requests)
        if base_model_name_or_path is not None:
            metadata["base_model_name_or_path"] = base_model_name_or_path
        return write_edit_adapter(self.deltas, path, metadata, export_rank)


class Editor:
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
        if processing_class is None:
            processing_class = load_tokenizer_for(model)
        self.model = model
        self.tokenizer = processing_class
        self.stats_dataset = stats_dataset
        self.callbacks = list(callbacks or [])
        self.layout = get_layout(model, self.args)
        self.state = process_state()
        self._statistics: StatisticsProvider | None = None
        self._statistics_key: tuple | None = None  # (StatisticsSettings, id(stats_dataset)) of `_statistics`
        self._templates: list[list[str]] | None = None
        self._algorithm: EditAlgorithm | None = None
        self._base_model_info: dict[str, Any] | None = None
        self._applied = AppliedEdits(model)
        self._merged: bool | None = None  # how the held edits are applied (`args.merge_edits` of the first edit)
        self._floor: HistoryFloor | None = None  # the batches `keep_history` consolidated
        self.history: list[EditOutput] = []

    # --------------------------------------------------------------------------------------------------- stages
    def _log(self, message: str, *values: Any) -> None:
        if self.state.is_main_process:
            logger.info(message, *values)

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
        args = self.resolved_args
        current = self._algorithm
        if current is None or current.name != args.algorithm or current.config.to_dict() != args.algorithm_config:
            if current is not None and current.state_dict():
                raise ValueError(
                    f"`args` changed the method from `{current.name}` {current.config.to_dict()} while it holds "
                    "state from earlier edits; call `restore()` first."
                )
            self._algorithm = get_algorithm(args.algorithm, args.algorithm_config)
        return self._algorithm

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
        self._algorithm = algorithm

    @property
    def context_templates(self) -> list[list[str]]:
        """The seeded context templates, sampled once per editor from the unedited model."""
        if self._templates is None:
            with self.unedited(), eval_mode(self.model):
                self._templates = generate_context_templates(
                    self.model, self.tokenizer, self.args.num_context_templates, self.args.context_template_length,
                    self.args.seed, chat=self.args.context_template_chat,
                )  # fmt: skip
        return self._templates

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
        return optimise_target_values(
            self.model,
            self.tokenizer,
            self.layout,
            requests,
            templates,
            z_layer,
            args.value_optimisation(),
            process_state=self.state,
            show_progress=self.state.is_main_process,
        )

    def _through_post_mlp_norm(self, layer: int, residuals: torch.Tensor, edit_outputs: torch.Tensor) -> torch.Tensor:
        """Map block-output residuals `(n, d)` to the edited projection's output space when an RMS norm sits between
        them (Gemma 2/3, OLMo 2); see [`~memit_hf.norms.rms_norm_residuals`]."""
        name = self.layout.post_mlp_norm_name(layer)
        if name is None:
            return residuals
        return rms_norm_residuals(self.model.get_submodule(name), residuals, edit_outputs)

    # ------------------------------------------------------------------------------------------------------ edit
    def edit(self, requests: Any, values: ValueResult | None = None) -> EditOutput:
        """Apply all `requests` at once, editing `self.model` in place.

        The model runs in evaluation mode (dropout off) during the edit and gets its own mode back afterwards.

        Args:
            requests (`datasets.Dataset`, `list[dict]`, `list[EditRequest]` or a JSON/JSONL path):
                Fact edits in any accepted record shape (see [`~memit_hf.requests.load_requests`]).
            values ([`~memit_hf.values.ValueResult`], *optional*):
                Target values of these requests from [`compute_values`] on the model as it is now; computed when
                `None`.

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
        start_time = time.perf_counter()
        timings: dict[str, float] = {}
        args = self.resolved_args
        layers, z_layer = args.layers, args.layers[-1]
        algorithm = self.algorithm
        if self._merged is not None and self._merged != args.merge_edits:
            raise ValueError(
                f"The edits held are applied with `merge_edits={self._merged}` but `args` now say "
                f"`merge_edits={args.merge_edits}`; call `restore()` first."
            )
        for callback in self.callbacks:
            callback.on_edit_begin(self, requests)
        self._log("Editing %d facts at layers %s with %s.", len(requests), layers, args.algorithm)

        if args.keep_history is not None and not args.merge_edits:
            raise ValueError("`keep_history` consolidates merged edits: it needs `merge_edits=True`.")
        tick = time.perf_counter()
        templates = self.context_templates
        check_request_lengths(self.tokenizer, requests, templates, self.model.config)
        timings["templates_seconds"] = time.perf_counter() - tick

        tick = time.perf_counter()
        statistics = self.get_statistics(layers)
        self._check_state_statistics(algorithm, statistics)
        for layer_statistics in statistics.values():
            algorithm.prepare(layer_statistics)  # validates every system before any weight changes
        timings["statistics_seconds"] = time.perf_counter() - tick

        tick = time.perf_counter()
        if values is None:
            for callback in self.callbacks:
                callback.on_values_begin(self, requests)
            values = self._target_values(requests, templates, z_layer, args)
        elif values.targets.shape[0] != len(requests) or values.z_layer not in (None, z_layer):
            raise ValueError(
                f"`values` hold {values.targets.shape[0]} requests at layer {values.z_layer}, but the edit has "
                f"{len(requests)} requests at layer {z_layer}: compute them with `compute_values(requests)`."
            )
        timings["values_seconds"] = time.perf_counter() - tick
        if not torch.isfinite(values.targets).all():
            bad = (~torch.isfinite(values.targets).all(1)).nonzero().squeeze(1).tolist()
            raise ValueError(f"Target values are not finite for requests {[requests[i].record_index for i in bad]}.")

        checkpoint = self._applied.checkpoint()
        tick = time.perf_counter()
        try:
            deltas, initial_outputs, final_outputs, rounding = self._solve_layers(
                requests, templates, values.targets.double(), statistics, algorithm, args
            )
            increments = algorithm.pending_increments()
            algorithm.commit()
        except BaseException:
            self._applied.revert(checkpoint)
            algorithm.discard()
            raise
        timings["update_seconds"] = time.perf_counter() - tick
        self._merged = args.merge_edits

        targets = values.targets.double()
        wanted = (targets - initial_outputs).norm(dim=1)
        missed = (targets - final_outputs).norm(dim=1)
        metrics = {
            "num_requests": float(len(requests)),
            "num_layers": float(len(layers)),
            **timings,
            "total_seconds": time.perf_counter() - start_time,
            "z_initial_loss": float(values.initial_loss.mean()),
            "z_final_loss": float(values.final_loss.mean()),
            "z_final_nll": float(values.final_nll.mean()),
            "z_mean_steps": float(values.steps.float().mean()),
            "residual_achieved": float((1 - missed / wanted.clamp_min(1e-12)).mean()),
            "merge_rounding_error": max(rounding),
            **algorithm.diagnostics(),
        }
        self._log(
            "Edit done in %.1fs: z loss %.3f -> %.3f, %.0f%% of the target residual achieved at layer %d.",
            metrics["total_seconds"], metrics["z_initial_loss"], metrics["z_final_loss"],
            100 * metrics["residual_achieved"], z_layer,
        )  # fmt: skip
        batch = {
            "algorithm": args.algorithm,
            "layers": list(layers),
            "num_requests": len(requests),
            "hyperparameters": args.editing_values(),
            "statistics": {name: layer_statistics.info() for name, layer_statistics in statistics.items()},
            "requests": [request.to_dict(EDIT_RECORD_KEYS) for request in requests],
            "metrics": dict(metrics),
        }
        metadata = {"model": self._model_info(), "batch": batch}
        output = EditOutput(
            deltas=deltas, metrics=metrics, requests=requests, values=values, metadata=metadata,
            state_increments=increments,
        )  # fmt: skip
        self.history.append(output)
        if args.keep_history is not None:
            self._consolidate(len(self.history) - args.keep_history)
        for callback in self.callbacks:
            callback.on_edit_end(self, output)
        return output

    @torch.no_grad()
    def _consolidate(self, num_batches: int) -> None:
        """Fold the oldest `num_batches` batches of `history` into the floor (see `keep_history`): the edited weights
        and the method's state after them are kept bit for bit, their updates summed into one per module."""
        if num_batches <= 0:
            return
        old, self.history = self.history[:num_batches], self.history[num_batches:]
        floor = self._floor
        weights = dict(floor.weights) if floor else {}
        for output in old:
            for delta in output.deltas:
                base = weights.get(delta.module_name)
                if base is None:
                    base = self._applied.pristine[delta.module_name]
                weights[delta.module_name] = merged_weight(base, delta)
        algorithm_state = {}
        if self._algorithm is not None and self._algorithm.state_dict():
            current = {name: tensor.clone() for name, tensor in self._algorithm.state_dict().items()}
            self._algorithm.replay(
                [output.state_increments for output in old], floor.algorithm_state if floor else None
            )
            algorithm_state = {name: tensor.clone() for name, tensor in self._algorithm.state_dict().items()}
            self._algorithm.load_state_dict(current)
        deltas, _ = prepare_deltas([*(floor.deltas if floor else []), *(d for o in old for d in o.deltas)])
        batches = [*(floor.batches if floor else []), *(output.metadata["batch"] for output in old)]
        self._floor = HistoryFloor(weights, algorithm_state, deltas, batches)

    def _batch_records(self) -> list[dict[str, Any]]:
        """The metadata entry of every batch the model holds, consolidated ones first."""
        return [*(self._floor.batches if self._floor else []), *(output.metadata["batch"] for output in self.history)]

    def _held_deltas(self) -> list[LayerDelta]:
        """Every update the model holds, in order (the consolidated ones summed per module first)."""
        return [*(self._floor.deltas if self._floor else []), *(d for output in self.history for d in output.deltas)]

    def _check_state_statistics(self, algorithm: EditAlgorithm, statistics: dict[str, LayerStatistics]) -> None:
        """A method that holds state from earlier edits continues only with the statistics those edits used."""
        batches = self._batch_records()
        if not algorithm.state_dict() or not batches:
            return
        used = batches[-1]["statistics"]
        for name, layer_statistics in statistics.items():
            if name in used and used[name]["key"] != layer_statistics.key:
                raise StateMismatchError(
                    f"`{algorithm.name}` holds state accumulated with the statistics {used[name]['key']} of `{name}`, "
                    f"but they are now {layer_statistics.key} (another corpus or `stats_*` arguments): call "
                    "`restore()` first, or keep the statistics of the earlier edits."
                )

    def _solve_layers(
        self,
        requests: list[EditRequest],
        templates: list[list[str]],
        targets: torch.Tensor,
        statistics: dict[str, LayerStatistics],
        algorithm: EditAlgorithm,
        args: EditingArguments,
    ) -> tuple[list[LayerDelta], torch.Tensor, torch.Tensor]:
        """Solve and apply the layers in order (MEMIT's spread: each layer writes its share of what is left).

        Returns:
            The deltas, the block-`z_layer` outputs `(n, d_model)` before the first and after the last update, and
            each update's merge rounding error (see [`~memit_hf.deltas.add_delta`]).
        """
        layers, z_layer = args.layers, args.layers[-1]
        deltas: list[LayerDelta] = []
        rounding: list[float] = []
        for i, layer in enumerate(layers):
            keys, current, edit_outputs = compute_keys_and_outputs(
                self.model, self.tokenizer, self.layout, requests, templates, layer, z_layer, return_edit_outputs=True
            )
            if i == 0:
                initial_outputs = current
            residuals = (targets - current) / (len(layers) - i)  # spread what is left over the remaining layers
            residuals = self._through_post_mlp_norm(layer, residuals, edit_outputs)
            name = self.layout.edit_name(layer)
            problem = LayerProblem(name, layer, keys, residuals, statistics[name])
            lora_B, lora_A = algorithm.solve(problem)
            if not (torch.isfinite(lora_B).all() and torch.isfinite(lora_A).all()):
                raise ValueError(f"The update of `{name}` is not finite.")
            delta = make_delta(name, self.model.get_submodule(name), lora_B, lora_A)
            rounding.append(self._applied.apply(delta, args.merge_edits))
            deltas.append(delta)
            for callback in self.callbacks:
                callback.on_layer_end(self, layer, delta)
        _, final_outputs = compute_keys_and_outputs(
            self.model, self.tokenizer, self.layout, requests, [["{}"]], z_layer, z_layer
        )
        return deltas, initial_outputs, final_outputs, rounding

    # ---------------------------------------------------------------------------------------------------- export
    def _model_info(self) -> dict[str, Any]:
        if self._base_model_info is None:
            info = model_identity(self.model)
            self._base_model_info = {
                "base_model_name_or_path": base_model_id(self.model),
                "base_model_revision": info["revision"],
                "model_type": info["model_type"],
                "num_parameters": info["num_parameters"],
                "dtype": info["dtype"],
                "embedding_digest": info["embedding_digest"],
            }
        return dict(self._base_model_info)

    def edit_metadata(self, include_requests: bool = True) -> dict[str, Any]:
        """What an exported adapter records about the edits in `history`: the base model, and per `edit()` call the
        algorithm, layers, hyperparameters, statistics fingerprints, metrics and requests.

        Args:
            include_requests (`bool`, *optional*, defaults to `True`): list every request; otherwise only their
                count and SHA-256.

        Raises:
            ValueError: when the model holds no edit.
        """
        batches = self._batch_records()
        if not batches:
            raise ValueError("The model holds no edit: call `edit()` first (`restore()` discards the edits).")
        return edit_metadata(self._model_info(), batches, include_requests)

    def _on_main_process(self, write: Any) -> Any:
        """Run `write()` on the main process only, then synchronise; its result (or `None` on other ranks)."""
        result = write() if self.state.is_main_process else None
        self.state.wait_for_everyone()
        return result

    def save_adapter(
        self,
        path: str | Path,
        export_rank: int | float | None = None,
        base_model_name_or_path: str | None = None,
        include_requests: bool = True,
        repo_id: str | None = None,
        overwrite_output_dir: bool = False,
    ) -> ExportReport | None:
        """Save every edit made so far as one standard peft LoRA adapter (`adapter_config.json`,
        `adapter_model.safetensors`), with the edit metadata (`memit_edits.json`) and a model card (`README.md`).

        Each edited module gets `r = lora_alpha = ` its number of edit keys (scaling 1) and holds the exact factors
        of its update; successive `edit()` calls are summed by concatenating their factors. Load it without memit-hf
        with `PeftModel.from_pretrained(base, path)`, `base.load_adapter(path)` or
        `AutoModelForCausalLM.from_pretrained(path)`.

        Args:
            path (`str` or `Path`): output directory (created; other files in it are kept).
            export_rank (`int` or `float`, *optional*): store at most this rank per module (`int`) or keep this
                fraction of each update's energy (`float` in (0, 1]). Lossy below the update's rank; the relative
                error is in the returned report and logged. Ranks above `min(d_in, d_out)` are always reduced to it,
                exactly.
            base_model_name_or_path (`str`, *optional*): the base model's Hub id to record (default: the model's
                `name_or_path`, unless it is a temporary path).
            include_requests (`bool`, *optional*, defaults to `True`): list the requests in the metadata and card
                (otherwise only their count and hash).
            repo_id (`str`, *optional*): repository named in the model card's loading snippets.
            overwrite_output_dir (`bool`, *optional*, defaults to `False`): remove a merged checkpoint found in
                `path` (otherwise refused: one kind of artefact per folder, see
                [`~memit_hf.export.check_output_dir`]).

        Returns:
            [`~memit_hf.export.ExportReport`]: ranks, reconstruction errors and sizes (`None` on non-main
            processes).

        Raises:
            ValueError: when `path` holds a merged checkpoint and `overwrite_output_dir` is `False` (on every
                process, before anything is written).
        """
        path = Path(path)
        metadata = self.edit_metadata(include_requests)
        if base_model_name_or_path is not None:
            metadata["base_model_name_or_path"] = base_model_name_or_path
        deltas = self._held_deltas()
        check_output_dir(path, "adapter", overwrite_output_dir)  # every process refuses, none waits at the barrier

        def write() -> ExportReport:
            report = write_edit_adapter(deltas, path, metadata, export_rank, repo_id, overwrite_output_dir)
            self._log(
                "Adapter: %d parameters, %.2f MB (dense updates: %.2f MB), max reconstruction error %.1e.",
                report.num_parameters, report.adapter_bytes / 1e6, report.dense_bytes / 1e6,
                report.max_reconstruction_error,
            )  # fmt: skip
            return report

        return self._on_main_process(write)

    def merge_and_save(
        self,
        path: str | Path,
        base_model_name_or_path: str | None = None,
        include_requests: bool = True,
        repo_id: str | None = None,
        overwrite_output_dir: bool = False,
        **save_kwargs: Any,
    ) -> None:
        """Save the edited model as a full checkpoint (`save_pretrained`, safetensors) with its tokenizer, the edit
        metadata and a model card; `AutoModelForCausalLM.from_pretrained(path)` loads it.

        Args:
            path (`str` or `Path`): output directory.
            base_model_name_or_path (`str`, *optional*): the base model's Hub id for the card's `base_model`.
            include_requests (`bool`, *optional*, defaults to `True`): list the requests in the metadata and card.
            repo_id (`str`, *optional*): repository named in the model card's loading snippets.
            overwrite_output_dir (`bool`, *optional*, defaults to `False`): remove an adapter found in `path`
                (otherwise refused with a `ValueError` on every process: one kind of artefact per folder).
            save_kwargs: passed to `save_pretrained` (e.g. `max_shard_size`).
        """
        metadata = self.edit_metadata(include_requests)
        if base_model_name_or_path is not None:
            metadata["base_model_name_or_path"] = base_model_name_or_path
        check_output_dir(path, "checkpoint", overwrite_output_dir)
        with self._applied.merged():  # edits held as hooks (`merge_edits=False`) are merged for the save only
            self._on_main_process(
                lambda: save_merged_checkpoint(
                    self.model, self.tokenizer, path, metadata, repo_id, overwrite_output_dir, **save_kwargs
                )
            )

    def push_to_hub(
        self,
        repo_id: str | None = None,
        merged: bool = False,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str | None = None,
        revision: str | None = None,
        export_rank: int | float | None = None,
        base_model_name_or_path: str | None = None,
        include_requests: bool = True,
    ) -> Any:
        """Push the edits to the Hub: the adapter (default) or the merged model, with the model card and metadata.

        Arguments left at `None` fall back to `args.hub_model_id`, `args.hub_private_repo` and `args.hub_token`, as
        `Trainer.push_to_hub` does. The repository is created if needed (`create_repo(exist_ok=True)`), then the
        folder is uploaded with `upload_folder`.

        Args:
            repo_id (`str`, *optional*): `"user/name"`; defaults to `args.hub_model_id`.
            merged (`bool`, *optional*, defaults to `False`): push the full edited checkpoint instead of the adapter.
            private (`bool`, *optional*): visibility of a new repository.
            token (`str`, *optional*): Hub token.
            commit_message (`str`, *optional*): the commit message.
            revision (`str`, *optional*): branch to push to.
            export_rank, base_model_name_or_path, include_requests: as in [`save_adapter`].

        Returns:
            `huggingface_hub.CommitInfo` of the upload (`None` on non-main processes).
        """
        repo_id = repo_id or self.args.hub_model_id
        if not repo_id:
            raise ValueError(
                "Name the repository: `push_to_hub(repo_id=...)` or `EditingArguments(hub_model_id=...)`."
            )
        private = self.args.hub_private_repo if private is None else private
        token = self.args.hub_token if token is None else token
        with tempfile.TemporaryDirectory(prefix="memit-hf-push-") as folder:
            if merged:
                self.merge_and_save(folder, base_model_name_or_path, include_requests, repo_id)
            else:
                self.save_adapter(folder, export_rank, base_model_name_or_path, include_requests, repo_id)
            result = None
            if self.state.is_main_process:
                num_edits = sum(int(batch.get("num_requests", 0)) for batch in self._batch_records())
                message = commit_message or f"Add {num_edits} fact edits ({'merged model' if merged else 'adapter'})"
                result = push_folder(folder, repo_id, private, token, message, revision)
            self.state.wait_for_everyone()
        return result

    # ----------------------------------------------------------------------------------------------------- state
    def _original_weight_digests(self, names: list[str]) -> dict[str, str]:
        """Digests of the weights of `names` before the first edit."""
        digests = {}
        for name in names:
            weight = self._applied.pristine.get(name)
            digests[name] = tensor_digest(
                weight if weight is not None else read_parameter(self.model.get_submodule(name))
            )
        return digests

    def editor_state(self) -> EditorState:
        """The state of this sequence of edits (what [`save_state`] writes). Its arguments are the editing
        hyperparameters alone (no loading, statistics-location or Hub setting, every secret redacted)."""
        args = self.resolved_args
        names = sorted({self.layout.edit_name(layer) for layer in args.layers} | set(self._applied.pristine))
        statistics: dict[str, str] = {}
        for batch in self._batch_records():
            statistics.update({name: info["key"] for name, info in batch["statistics"].items()})
        batches = []
        for output in self.history:
            requests = [request.to_dict() for request in output.requests]
            batches.append(SavedBatch(list(output.deltas), list(output.state_increments), output.metadata["batch"],
                                      requests))  # fmt: skip
        algorithm = self._algorithm
        return EditorState(
            model=self._model_info(),
            original_weights=self._original_weight_digests(names),
            algorithm=args.algorithm,
            algorithm_config=args.algorithm_config,
            arguments=args.editing_values(),
            context_templates=self.context_templates,
            statistics=statistics,
            batches=batches,
            algorithm_state=algorithm.state_dict() if algorithm is not None else {},
            floor=self._floor,
        )

    def save_state(
        self,
        path: str | Path,
        save_adapters: bool = True,
        include_requests: bool = True,
        base_model_name_or_path: str | None = None,
        on_step: Callable[[str], None] | None = None,
    ) -> ExportReport | None:
        """Save this sequence of edits so that another process continues it with [`from_state`].

        The folder gets `editor_state.json` (the manifest) and the state's tensors (the exact factors of every
        batch, the method's accumulated state and what [`rollback`] needs), and with `save_adapters` the whole
        history as one peft adapter at its top level (`PeftModel.from_pretrained(base, path)` loads it; its model
        card lists the batches in order) and every batch as its own adapter in `batches/0000`, `batches/0001`, ...
        (stack or toggle them with peft). The folder is written as one transaction (see
        [`~memit_hf.editor_state.write_state`]): a reader sees the previous state or this one, never a mix, and the
        adapters of batches undone by [`rollback`] are removed. Run [`~memit_hf.editor_state.StateLock`] around a
        load-edit-save cycle that other runs may share.

        Args:
            path (`str` or `Path`): the state folder (created; a state already there is replaced).
            save_adapters (`bool`, *optional*, defaults to `True`): also write the adapters.
            include_requests (`bool`, *optional*, defaults to `True`): list the requests in the adapters' metadata
                and cards (the state itself always keeps them: it needs them to be continued and rolled back).
            base_model_name_or_path (`str`, *optional*): the base model's Hub id to record in the adapters.
            on_step (`Callable[[str], None]`, *optional*): called before each file operation of the commit (a seam
                for tests of interrupted saves).

        Returns:
            [`~memit_hf.export.ExportReport`] of the whole-history adapter (`None` without adapters, without edits
            or on non-main processes).
        """
        path = Path(path)
        state = self.editor_state()
        reports: list[ExportReport] = []

        def write_exports(folder: Path) -> None:
            if not (save_adapters and self._batch_records()):
                return
            metadata = self.edit_metadata(include_requests)
            if base_model_name_or_path is not None:
                metadata["base_model_name_or_path"] = base_model_name_or_path
            reports.append(write_edit_adapter(self._held_deltas(), folder, metadata))
            offset = len(self._floor.batches) if self._floor else 0
            for i, output in enumerate(self.history):  # named like the whole-history adapter (warned once)
                one = edit_metadata(self._model_info(), [output.metadata["batch"]], include_requests)
                one["base_model_name_or_path"] = metadata["base_model_name_or_path"]
                save_adapter_files(output.deltas, folder / BATCH_ADAPTERS_DIR / f"{offset + i:04d}",
                                   one["base_model_name_or_path"], one.get("base_model_revision"), None, one)  # fmt: skip

        def write() -> ExportReport | None:
            write_state(state, path, write_exports, on_step)
            self._log("Saved the editor state (%d batches, %d edits) to %s.", len(self._batch_records()),
                      state.num_edits, path)  # fmt: skip
            if not reports:
                return None
            report = reports[0]
            report.path = str(path)
            return report

        return self._on_main_process(write)

    @classmethod
    def from_state(
        cls,
        model: PreTrainedModel | str,
        path: str | Path,
        args: EditingArguments | None = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        stats_dataset: Any = None,
        callbacks: list[EditorCallback] | None = None,
    ) -> "Editor":
        """Continue a sequence of edits saved by [`save_state`]: re-apply its batches to the base `model`, exactly,
        and restore the method's state, the context templates and the history (so [`rollback`] and the exports work
        across processes).

        A state folder is data: it never chooses how `model` is loaded, where statistics come from or where anything
        is published (`model_init_kwargs`, `stats_repo`, `stats_cache_dir`, `hub_*`, `output_dir` always come from
        `args` or the defaults, see [`~memit_hf.arguments.CALLER_FIELDS`]). It is trusted input for the edits it
        holds: every factor is checked (module among the state's edited layers, shape, finite values) and every
        request validated before anything is applied, and any failure leaves `model` bit-identical to what it was.

        Args:
            model (`PreTrainedModel` or `str`): the original base model the state was made on (not a merged
                checkpoint), or its id / path (loaded with `args.model_init_kwargs`, never the state's).
            path (`str` or `Path`): the state folder.
            args ([`EditingArguments`], *optional*): the arguments of the next edits; default: the editing
                hyperparameters saved with the state and the defaults for everything else. They must name the saved
                method, configuration and layers.
            processing_class, stats_dataset, callbacks: as in [`Editor`]; `stats_dataset` (or `args.stats_repo`)
                must give the statistics the saved edits used (the statistics fingerprints are checked).

        Returns:
            [`Editor`]: holding the saved edits.

        Raises:
            FileNotFoundError: when `path` holds no state.
            StateMismatchError: for a malformed state or one made for another model, other statistics, or other
                method settings; the model is then unchanged.
        """
        path = Path(path)
        state = read_state(path)
        if args is None:
            try:
                args = EditingArguments.from_saved(state.arguments)
            except (TypeError, ValueError) as error:
                raise StateMismatchError(
                    f"The arguments saved in the editor state in `{path}` are invalid: {error}"
                ) from error
        editor = cls(model, args=args, processing_class=processing_class, stats_dataset=stats_dataset,
                     callbacks=callbacks)  # fmt: skip
        editor._load_state(state, path)
        editor._log("Continued the editor state in %s: %d batches, %d edits.", path, len(editor._batch_records()),
                    state.num_edits)  # fmt: skip
        return editor

    def _load_state(self, state: EditorState, path: Path) -> None:
        """Check `state` against this editor's model, arguments and statistics, then apply it (all or nothing)."""
        resolved = self.resolved_args
        saved_layers = state.arguments.get("layers")
        wanted = (state.algorithm, state.algorithm_config, saved_layers)
        if (resolved.algorithm, resolved.algorithm_config, resolved.layers) != wanted:
            raise StateMismatchError(
                f"The editor state in `{path}` holds `{state.algorithm}` {state.algorithm_config} at layers "
                f"{saved_layers}, but `args` say `{resolved.algorithm}` {resolved.algorithm_config} at layers "
                f"{resolved.layers}."
            )
        if state.floor is not None and not resolved.merge_edits:
            raise StateMismatchError(f"The editor state in `{path}` is consolidated; continue it with `merge_edits`.")
        check_model(state, self._model_info(), self._original_weight_digests(list(state.original_weights)), str(path))
        edited = {self.layout.edit_name(layer) for layer in resolved.layers}
        check_state_content(state, self.model, edited, str(path))
        try:
            requests = [load_requests(batch.requests) for batch in state.batches]
        except (TypeError, ValueError) as error:
            raise StateMismatchError(f"The editor state in `{path}` holds an invalid request: {error}") from error
        if state.statistics:
            layers = sorted({layer for batch in self._saved_batches(state) for layer in batch["layers"]})
            fingerprints = self.statistics.fingerprints(layers)
            keys = {self.layout.edit_name(layer): fingerprint_key(fp) for layer, fp in fingerprints.items()}
            check_statistics(state, keys, str(path))
        model_info = self._model_info()
        checkpoint = self._applied.checkpoint()
        try:
            with torch.no_grad():
                floor = state.floor
                self._applied.replay([d for batch in state.batches for d in batch.deltas], resolved.merge_edits,
                                     floor.weights if floor else None)  # fmt: skip
            if state.algorithm_state:
                self.algorithm.load_state_dict(state.algorithm_state)
        except BaseException:
            self._applied.revert(checkpoint)
            self._algorithm = None
            raise
        self._templates = [list(group) for group in state.context_templates]
        self._merged = resolved.merge_edits
        self._floor = state.floor
        self.history = [
            EditOutput(
                deltas=list(batch.deltas),
                metrics=dict(batch.metadata.get("metrics", {})),
                requests=batch_requests,
                metadata={"model": model_info, "batch": batch.metadata},
                state_increments=list(batch.increments),
            )  # fmt: skip
            for batch, batch_requests in zip(state.batches, requests)
        ]

    @staticmethod
    def _saved_batches(state: EditorState) -> list[dict[str, Any]]:
        return [*(state.floor.batches if state.floor else []), *(batch.metadata for batch in state.batches)]

    @torch.no_grad()
    def restore(self) -> None:
        """Return every edited module to its weights before the first `edit()`, bit for bit, and forget the edits
        (the history, the consolidated batches and the algorithm's state)."""
        self._applied.reset()
        self._merged = None
        self._floor = None
        self.history.clear()
        self._algorithm = None

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
        if not 1 <= k <= len(self.history):
            floor = f" ({len(self._floor.batches)} more are consolidated by `keep_history`)" if self._floor else ""
            raise ValueError(
                f"`k` must be between 1 and the number of edits held ({len(self.history)}){floor}, got {k}."
            )
        kept = self.history[: len(self.history) - k]
        floor = self._floor
        self._applied.replay([delta for output in kept for delta in output.deltas], self._merged is not False,
                             floor.weights if floor else None)  # fmt: skip
        if self._algorithm is not None:
            self._algorithm.replay(
                [output.state_increments for output in kept], floor.algorithm_state if floor else None
            )
        self.history = kept

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
            metrics=metrics, batch_size=batch_size, perplexity_texts=perplexity_texts,
            perplexity_num_tokens=perplexity_num_tokens, reference_texts=reference_texts, seed=self.args.seed,
        )  # fmt: skip
        # The generative family's neighborhood stability compares with the unedited model's continuations.
        edited = bool(self._batch_records())
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
        return self._applied.unedited()
