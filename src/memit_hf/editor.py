"""Editor: the Trainer-like entry point that wires requests, keys, values, statistics and solves into an edit."""

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .algorithms import get_algorithm
from .architectures import get_layout, resolve_arguments
from .arguments import EditingArguments
from .covariance import (
    MODEL_SAMPLES,
    SecondMoment,
    _digest,
    collect_second_moments,
    corpus_texts,
    default_cache_dir,
    load_cached,
    sample_corpus,
    save_cached,
    statistics_fingerprint,
    token_pieces,
)
from .deltas import LayerDelta, WeightSnapshot, add_delta, make_delta
from .keys import compute_keys_and_outputs, fill, generate_context_templates
from .requests import EditRequest, load_requests
from .tokenization import encode_targets, encode_texts
from .values import ValueResult, compute_target_values


logger = logging.getLogger(__name__)


class EditorCallback:
    """Base class for callbacks of [`Editor`]; override the events you need (all receive the editor)."""

    def on_edit_begin(self, editor: "Editor", requests: list[EditRequest]) -> None:
        pass

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
    """

    deltas: list[LayerDelta]
    metrics: dict[str, float]
    requests: list[EditRequest]
    values: ValueResult | None = field(default=None, repr=False)


class Editor:
    """Edit the factual knowledge of a causal LM with MEMIT, like a [`~transformers.Trainer`] trains it.

    Args:
        model (`PreTrainedModel` or `str`):
            The model to edit in place, or a model id / local path (a `.gguf` file is loaded with `gguf_file=`), loaded
            with `args.model_init_kwargs`.
        args ([`EditingArguments`], *optional*):
            Editing hyperparameters; `None` gives the defaults, and fields left at `None` get per-model defaults.
        processing_class (`PreTrainedTokenizerBase`, *optional*):
            The tokenizer; loaded from `model` when it is a string.
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
            raise ValueError("`processing_class` (the tokenizer) is required when `model` is a model instance.")
        self.model = model
        self.tokenizer = processing_class
        self.stats_dataset = stats_dataset
        self.callbacks = list(callbacks or [])
        self.layout = get_layout(model, self.args)
        self.state = PartialState()
        self._templates: list[list[str]] | None = None
        self._statistics: dict[str, SecondMoment] = {}
        self._pristine: dict[str, torch.Tensor] = {}
        self.history: list[EditOutput] = []

    # ----------------------------------------------------------------------------------------------------- helpers
    def _log(self, message: str, *values: Any) -> None:
        if self.state.is_main_process:
            logger.info(message, *values)

    @property
    def resolved_args(self) -> EditingArguments:
        """`args` with every per-model default filled in."""
        return resolve_arguments(self.model, self.args, self.layout)

    @property
    def context_templates(self) -> list[list[str]]:
        """The seeded context templates, sampled once per editor from the unedited model."""
        if self._templates is None:
            self._templates = generate_context_templates(
                self.model, self.tokenizer, self.args.num_context_templates, self.args.context_template_length,
                self.args.seed,
            )  # fmt: skip
        return self._templates

    def _corpus_id_and_texts(self) -> tuple[str, Any]:
        corpus = self.stats_dataset
        if corpus is None:
            a = self.args
            return f"{MODEL_SAMPLES}:{a.stats_sample_texts}x{a.stats_sample_length}", None
        if hasattr(corpus, "_fingerprint"):
            return f"dataset:{corpus._fingerprint}", corpus
        texts = corpus_texts(corpus)
        return f"texts:{_digest(texts)}", texts

    def get_statistics(self, layers: list[int]) -> dict[str, SecondMoment]:
        """Second moments of the edited modules' inputs at `layers`, from memory, the disk cache, or one pass."""
        names = [self.layout.edit_name(layer) for layer in layers]
        missing = [name for name in names if name not in self._statistics]
        if not missing:
            return {name: self._statistics[name] for name in names}
        corpus_id, texts = self._corpus_id_and_texts()
        cache_dir = Path(self.args.stats_cache_dir) if self.args.stats_cache_dir else default_cache_dir()
        fingerprints = {
            name: statistics_fingerprint(self.model, self.tokenizer, name, corpus_id, self.args) for name in missing
        }
        to_compute = []
        for name in missing:
            cached = load_cached(cache_dir, fingerprints[name])
            if cached is None:
                to_compute.append(name)
            else:
                self._statistics[name] = cached
        if to_compute:
            with self.unedited():  # statistics always describe the original model
                self._collect(to_compute, texts, cache_dir, fingerprints)
        return {name: self._statistics[name] for name in names}

    def _collect(self, to_compute: list[str], texts: Any, cache_dir: Path, fingerprints: dict) -> None:
        """Collect and cache the statistics of `to_compute` in one pass over the corpus."""
        if texts is None:
            self._log("No `stats_dataset` given: sampling statistics text from the model itself (offline).")
            texts = sample_corpus(
                self.model, self.tokenizer, self.args.stats_sample_texts, self.args.stats_sample_length,
                self.args.seed,
            )  # fmt: skip
        elif not isinstance(texts, list):
            texts = corpus_texts(texts)
        pieces = token_pieces(
            self.tokenizer, texts, self.args.stats_num_tokens, self.args.stats_max_length, self.args.seed
        )
        moments = collect_second_moments(self.model, self.tokenizer, to_compute, pieces, self.args.stats_batch_tokens)
        for name, moment in moments.items():
            self._statistics[name] = moment
            if self.state.is_main_process:
                save_cached(cache_dir, fingerprints[name], moment)
        self.state.wait_for_everyone()
        self._log("Collected statistics for %d modules over %d tokens.", len(to_compute), moments[name].count)

    def _validate_tokens(self, requests: list[EditRequest]) -> None:
        """Tokenisation checks that must pass before any weight changes."""
        targets = encode_targets(self.tokenizer, [r.target_new for r in requests])
        texts_ends = [fill("{}", r) for r in requests]
        prefix_lengths = [
            len(ids)
            for ids in encode_texts(
                self.tokenizer, [t[: e - len(r.subject)].rstrip() for (t, e), r in zip(texts_ends, requests)]
            )
        ]
        subject_lengths = [len(ids) for ids in encode_texts(self.tokenizer, [t[:e] for t, e in texts_ends])]
        for request, target, before, through in zip(requests, targets, prefix_lengths, subject_lengths):
            if not target:
                raise ValueError(
                    f"Request {request.record_index}: field `target_new` ({request.target_new!r}) encodes to no token."
                )
            if through <= before and request.prompt.index("{}") > 0:
                raise ValueError(
                    f"Request {request.record_index}: field `subject` ({request.subject!r}) is not found as its own "
                    f"tokens in the prompt {request.text!r}."
                )

    # ------------------------------------------------------------------------------------------------------ edit
    def edit(self, requests: Any) -> EditOutput:
        """Apply all `requests` at once, editing `self.model` in place.

        Args:
            requests (`datasets.Dataset`, `list[dict]`, `list[EditRequest]` or a JSON/JSONL path):
                Fact edits in any accepted record shape (see [`~memit_hf.requests.load_requests`]).

        Returns:
            [`EditOutput`]: the deltas and metrics.

        Raises:
            ValueError: for malformed requests (naming the record and field), non-finite target values, or an
                ill-conditioned solve; the weights are then unchanged (bit-identical).
        """
        start_time = time.perf_counter()
        timings: dict[str, float] = {}
        requests = load_requests(requests)
        if not requests:
            raise ValueError("`requests` is empty.")
        args = self.resolved_args
        self._validate_tokens(requests)
        layers, z_layer = args.layers, args.layers[-1]
        algorithm = get_algorithm(args.algorithm)
        for callback in self.callbacks:
            callback.on_edit_begin(self, requests)
        self._log("Editing %d facts at layers %s with %s.", len(requests), layers, args.algorithm)

        tick = time.perf_counter()
        templates = self.context_templates
        timings["templates_seconds"] = time.perf_counter() - tick

        tick = time.perf_counter()
        statistics = self.get_statistics(layers)
        covariances = {name: moment.mean() for name, moment in statistics.items()}
        for name, covariance in covariances.items():
            algorithm.check_covariance(covariance, args.mom2_update_weight, f"The system for `{name}`")
        timings["statistics_seconds"] = time.perf_counter() - tick

        tick = time.perf_counter()
        values = compute_target_values(
            self.model, self.tokenizer, self.layout, requests, templates, z_layer,
            num_steps=args.v_num_grad_steps, lr=args.v_lr, weight_decay=args.v_weight_decay,
            clamp_norm_factor=args.clamp_norm_factor, kl_factor=args.kl_factor,
            early_stop_loss=args.v_early_stop_loss, batch_size=args.v_batch_size,
            show_progress=self.state.is_main_process,
        )  # fmt: skip
        timings["values_seconds"] = time.perf_counter() - tick
        if not torch.isfinite(values.targets).all():
            bad = (~torch.isfinite(values.targets).all(1)).nonzero().squeeze(1).tolist()
            raise ValueError(f"Target values are not finite for requests {[requests[i].record_index for i in bad]}.")
        targets = values.targets.double()  # (n, d_model)

        names = [self.layout.edit_name(layer) for layer in layers]
        snapshot = WeightSnapshot(self.model, names)
        deltas: list[LayerDelta] = []
        tick = time.perf_counter()
        try:
            for i, layer in enumerate(layers):
                keys, current, edit_outputs = compute_keys_and_outputs(
                    self.model, self.tokenizer, self.layout, requests, templates, layer, z_layer,
                    return_edit_outputs=True,
                )  # fmt: skip
                if i == 0:
                    initial_outputs = current
                residuals = (targets - current) / (len(layers) - i)  # spread what is left over the remaining layers
                residuals = self._through_post_mlp_norm(layer, residuals, edit_outputs)
                name = self.layout.edit_name(layer)
                lora_B, lora_A = algorithm.solve(keys, residuals, covariances[name], args.mom2_update_weight)
                if not (torch.isfinite(lora_B).all() and torch.isfinite(lora_A).all()):
                    raise ValueError(f"The update of `{name}` is not finite.")
                delta = make_delta(name, self.model.get_submodule(name), lora_B, lora_A)
                add_delta(self.model, delta)
                deltas.append(delta)
                for callback in self.callbacks:
                    callback.on_layer_end(self, layer, delta)
            _, final_outputs = compute_keys_and_outputs(
                self.model, self.tokenizer, self.layout, requests, [["{}"]], z_layer, z_layer
            )
        except BaseException:
            snapshot.restore()
            raise
        timings["update_seconds"] = time.perf_counter() - tick
        for name, original in snapshot.saved.items():
            self._pristine.setdefault(name, original)

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
        }
        self._log(
            "Edit done in %.1fs: z loss %.3f -> %.3f, %.0f%% of the target residual achieved at layer %d.",
            metrics["total_seconds"], metrics["z_initial_loss"], metrics["z_final_loss"],
            100 * metrics["residual_achieved"], z_layer,
        )  # fmt: skip
        output = EditOutput(deltas=deltas, metrics=metrics, requests=requests, values=values)
        self.history.append(output)
        for callback in self.callbacks:
            callback.on_edit_end(self, output)
        return output

    @torch.no_grad()
    def _through_post_mlp_norm(self, layer: int, residuals: torch.Tensor, edit_outputs: torch.Tensor) -> torch.Tensor:
        """Map block-output residuals `(n, d)` to the edited projection's output space when an RMS norm sits between
        them (Gemma 2/3): `norm(m) = g * m / rms(m)`, so a change `r` after the norm needs about `r * rms(m) / g`
        before it (first order; the re-measured residual of the next layer corrects the rest)."""
        name = self.layout.post_mlp_norm_name(layer)
        if name is None:
            return residuals
        norm = self.model.get_submodule(name)
        weight = next(norm.parameters())
        gain = norm(torch.ones(1, residuals.shape[1], dtype=weight.dtype, device=weight.device)).double().cpu()[0]
        eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6)))
        rms = (edit_outputs.pow(2).mean(dim=1, keepdim=True) + eps).sqrt()  # (n, 1)
        return residuals * rms / gain.where(gain.abs() > 1e-6, torch.full_like(gain, 1e-6))

    @torch.no_grad()
    def restore(self) -> None:
        """Return every edited module to its weights before the first `edit()`, bit for bit."""
        for name, original in self._pristine.items():
            self.model.get_submodule(name).weight.copy_(original)
        self._pristine.clear()
        self.history.clear()

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
                `"generation"`, `"perplexity"`.
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
        results = evaluate_model(self.model, self.tokenizer, requests, **kwargs)
        if include_pre and self._pristine:
            with self.unedited():
                pre = evaluate_model(self.model, self.tokenizer, requests, **kwargs)
            results.update({f"pre_{key}": value for key, value in pre.items()})
        return results

    def unedited(self):
        """Context manager in which `self.model` temporarily has its original weights."""
        return _Unedited(self)


class _Unedited:
    def __init__(self, editor: Editor):
        self.editor = editor

    def __enter__(self):
        model = self.editor.model
        self.current = WeightSnapshot(model, list(self.editor._pristine))
        with torch.no_grad():
            for name, original in self.editor._pristine.items():
                model.get_submodule(name).weight.copy_(original)
        return model

    def __exit__(self, *exc):
        self.current.restore()
        return False


def load_model_and_tokenizer(
    path: str, model_init_kwargs: dict | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a Hub id, a local directory or a `.gguf` file."""
    kwargs = dict(model_init_kwargs or {})
    kwargs.setdefault("dtype", torch.float32)
    if path.endswith(".gguf"):
        directory, filename = str(Path(path).parent), Path(path).name
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, **kwargs)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model.eval(), tokenizer
