"""EditingArguments: every knob of an edit, usable with `HfArgumentParser` and YAML recipes."""

import os
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import yaml

from .algorithms.config import AlgorithmConfig
from .algorithms.registry import ALGORITHM_NAMES, get_config_class, method_field_names
from .redaction import redact
from .settings import CHAT_FORMS, StatisticsSettings, ValueOptimisation


CALLER_FIELDS = (
    "model_init_kwargs",
    "stats_cache_dir",
    "stats_repo",
    "stats_repo_revision",
    "stats_checkpoint_every",
    "stats_checkpoint_seconds",
    "output_dir",
    "push_to_hub",
    "hub_model_id",
    "hub_private_repo",
    "hub_token",
    "redact_keys",
)
"""Fields that say how a model is loaded, where statistics live and where outputs go (the Hub included): they belong to
the caller, so [`~memit_hf.Editor.from_state`] never takes them from a saved state (a state folder is data, not
configuration of loading or publishing)."""


@dataclass
class EditingArguments:
    """Arguments of [`Editor`], in the style of [`~transformers.TrainingArguments`].

    Every field is also a command-line flag (`HfArgumentParser(EditingArguments)`) and a YAML key
    (`EditingArguments.from_yaml`). Fields left at `None` are filled per model by
    [`~memit_hf.defaults.resolve_arguments`]: the paper's settings for GPT-2 XL, GPT-J-6B and Llama-3-8B (with the
    methods they were tuned for), generic ones elsewhere (see [`~memit_hf.defaults.MODEL_DEFAULTS`]).

    > Parameters that control the algorithm

    Args:
        algorithm (`str`, *optional*, defaults to `"memit"`):
            A registered method (`memit_hf.algorithms.ALGORITHM_NAMES`): `"memit"` (least squares spread over
            `layers`) or `"rome"` (rank-one update of a single layer).
        algorithm_config (`dict` or [`~memit_hf.algorithms.AlgorithmConfig`], *optional*):
            The method's own hyperparameters, e.g. `{"mom2_update_weight": 5000.0}` for MEMIT or a `MEMITConfig`.
            Stored as a dict of every field of the method's configuration (defaults filled in); `method_config` gives
            the configuration object. In YAML recipes and on the command line the fields are flat keys/flags
            (`mom2_update_weight: 5000.0`, `--mom2_update_weight 5000`).
        layers (`list[int]`, *optional*):
            Decoder layers whose MLP down-projection is edited, ascending. Defaults to the paper's layers for the
            models of [`~memit_hf.defaults.MODEL_DEFAULTS`] (GPT-2 XL 13..17, GPT-J 3..8, Llama-3-8B 4..8), otherwise
            five layers starting at 10 % of the depth for MEMIT, one layer at 20 % for ROME (see
            [`~memit_hf.defaults.default_layers`]); the method decides how many.

    > Parameters that control the target-value optimisation

    Args:
        v_num_grad_steps (`int`, *optional*):
            Maximum number of optimisation iterations (the last one takes no step, as in the reference). Defaults per
            model: 20 on GPT-2 XL (the MEMIT paper's setting), 25 elsewhere.
        v_lr (`float`, *optional*):
            Adam learning rate for the residual delta.
        v_weight_decay (`float`, *optional*):
            Weight of `||delta|| / ||h||^2`.
        clamp_norm_factor (`float`, *optional*):
            Maximum `||delta||` as a multiple of `||h||` at the subject token.
        kl_factor (`float`, *optional*, defaults to `0.0625`):
            Weight of the KL term keeping "{subject} is a" unchanged.
        v_early_stop_loss (`float`, *optional*, defaults to `0.05`):
            A request stops optimising once its loss falls below this value.
        v_early_stop_margin (`float`, *optional*):
            A request also stops `v_early_stop_patience` steps after every target token first became the most likely
            token in every one of its prompts by at least this log-probability margin (nats). Off (`None`) by
            default: only the loss rule stops a request (the reference's behaviour; 22.9 of 25 iterations on average
            on SmolLM2). A margin trades generalisation for speed: on the first 100 CounterFact records on SmolLM2,
            `1.0` takes 15.4 iterations (1.04 s per edit on 2 CPU cores against 1.47 s) with teacher-forced ES / PS /
            NS within 1 point, but greedy paraphrases name the new object 59.5 % of the time instead of 66.0 %
            (`benchmarks/README.md`).
        v_early_stop_patience (`int`, *optional*, defaults to `5`):
            Steps taken after the margin is first reached.
        v_batch_size (`int`, *optional*):
            Requests optimised together in one chunk (chunks group requests of equal token lengths). Defaults to 16
            on a CPU (the fastest on a 2-core machine: 1.34 s per edit against 1.43 s at 32) and 128 on an
            accelerator, where a chunk that runs out of memory is split in halves and retried (the same results:
            requests are independent), as `auto_find_batch_size` does for training.
        v_autocast_dtype (`str`, *optional*):
            Run the blocks after the z layer and the LM head under `torch.autocast` with this dtype (`"bfloat16"` or
            `"float16"`) during the z optimisation; the delta, the loss and the Adam state stay float32. Off by
            default: on a CPU with AMX it made the z optimisation slower, not faster (`benchmarks/README.md`).
        v_first_token_weight (`float`, *optional*, defaults to `1.0`):
            Weight of a target's first token in the z loss relative to each later token (a prompt's token weights
            still sum to one); see [`~memit_hf.settings.ValueOptimisation`].
        v_norm_anchor (`float`, *optional*):
            Norm-Anchor Scaling (NAS) for long sequences of edits: each solved value vector (the edited projection's
            output plus the z delta) is rescaled to this norm, the original model's mean (compute it with
            [`~memit_hf.Editor.value_norm_anchor`]). `None` (the default): off.
        v_norm_anchor_skip (`float`, *optional*, defaults to `2.0`):
            With `v_norm_anchor`: a request whose value norm exceeds this multiple of the anchor is left unchanged
            at this edit (NAS's rule); `None`: rescale them all.
        num_context_templates (`int`, *optional*, defaults to `5`):
            Sampled prefixes added to the bare prompt.
        context_template_length (`int`, *optional*, defaults to `10`):
            Token length of each sampled prefix, the start word included.
        context_template_chat (`bool`, *optional*):
            Add the chat groups of context templates (`context_template_chat_forms`): the prompt sent as a user turn
            through the tokenizer's chat template, so the edit is also keyed and optimised where an instruct model
            meets it in chat use. Default (`None`): on when the tokenizer has a chat template; ignored for tokenizers
            without one.
        context_template_chat_forms (`list[str]`, *optional*, defaults to `["question", "answer"]`):
            The chat groups, one per form (see [`~memit_hf.settings.CHAT_FORMS`]): `"question"` (the target opens the
            assistant's answer) and `"answer"` (the assistant restates the prompt and completes it with the target,
            where a chat answer usually names the object).

    > Parameters that control how the edits are applied

    Args:
        merge_edits (`bool`, *optional*, defaults to `True`):
            Add each update to the edited weights in place. With `False` the weights stay untouched and every edited
            module adds its exact low-rank update to its output in float32 (like an un-merged peft LoRA adapter),
            so nothing of the update is rounded away: use it for half-precision models, where merging in place rounds
            small updates (see `metrics["merge_rounding_error"]`). The exported adapter is exact either way.

    > Parameters that control the covariance statistics

    Args:
        stats_num_tokens (`int`, *optional*, defaults to `100000`):
            Token budget of the second-moment statistics.
        stats_max_length (`int`, *optional*, defaults to `512`):
            Texts are cut into pieces of at most this many tokens.
        stats_batch_tokens (`int`, *optional*, defaults to `4096`):
            Padded tokens per forward pass while collecting statistics.
        stats_cache_dir (`str`, *optional*):
            Where statistics are cached. Defaults to `$HF_HOME/memit_hf/stats`.
        stats_sample_texts (`int`, *optional*, defaults to `64`):
            When no corpus is given, the number of texts sampled from the model itself (offline default source).
        stats_sample_length (`int`, *optional*, defaults to `128`):
            Token length of each model-sampled text.
        stats_checkpoint_every (`int`, *optional*):
            Save the partial sums of a statistics collection after every this many batches (of each process), next
            to the cache entries; an interrupted collection resumes from its last checkpoint with bit-identical
            results. The checkpoint is removed once the statistics are cached.
        stats_checkpoint_seconds (`float`, *optional*, defaults to `600.0`):
            Also save a checkpoint whenever this many seconds have passed since the last one; `None` turns the
            timed checkpoints off.
        stats_repo (`str`, *optional*):
            A Hugging Face Hub dataset repository id or a local folder holding statistics (as `memit-hf stats
            --push_to_hub` writes them). They are fetched into `stats_cache_dir` and used instead of collecting
            statistics over a corpus, after checking that their fingerprint matches the model (model weights,
            dtype, layer); `stats_dataset` is then not used.
        stats_repo_revision (`str`, *optional*):
            Branch, tag or commit of `stats_repo`.

    > Parameters that control the run

    Args:
        output_dir (`str`, *optional*):
            Where outputs are written, as `TrainingArguments.output_dir`: the default folder of
            [`Editor.save_adapter`], [`Editor.merge_and_save`] and [`Editor.save_state`], and the folder of the
            `memit-hf` commands' outputs (`--output_dir`; `memit-hf edit` defaults it to `--state_dir`).
        seed (`int`, *optional*, defaults to `42`):
            Seed of the context templates and the model-sampled statistics corpus.
        push_to_hub (`bool`, *optional*, defaults to `False`):
            Whether what is saved is also pushed to `hub_model_id`, as `TrainingArguments.push_to_hub` makes
            `Trainer.save_model` push: [`Editor.save_adapter`] and [`Editor.merge_and_save`] upload the folder they
            wrote (`memit-hf edit` saves through them; with the adapter in `--state_dir` it calls
            [`Editor.push_to_hub`]), and `memit-hf stats` pushes the statistics to a Hub dataset repository.
        hub_model_id (`str`, *optional*):
            Repository id for [`Editor.push_to_hub`], e.g. `"user/smollm2-edits"`.
        hub_private_repo (`bool`, *optional*):
            Create the repository as private (`None`: the account's default).
        hub_token (`str`, *optional*):
            Hub token; never written to exported metadata. Defaults to the logged-in token or `HF_TOKEN`.
        model_init_kwargs (`dict`, *optional*):
            Keyword arguments of `AutoModelForCausalLM.from_pretrained` when `Editor` is given a model id or path.
        redact_keys (`list[str]`, *optional*):
            Further keys whose values are secrets, redacted (`"<REDACTED>"`) wherever the arguments are written
            (adapters, checkpoints, states, CLI outputs), besides `token`, `hub_token`, `use_auth_token`, `api_key`,
            ... and any `hf_...` token inside a string (see [`~memit_hf.redaction.redact`]).
        keep_history (`int`, *optional*):
            How many of the latest `edit()` calls keep what [`~memit_hf.Editor.rollback`] needs (their own factors,
            the method's Gram increments and target values). Older batches are consolidated: their updates are summed
            exactly into one low-rank update per module (re-factored to at most `min(d_in, d_out)` when wider), and a
            bit-exact copy of the edited weights and of the method's state at that point becomes the rollback floor.
            Memory then stays constant in the number of edits (history and saved state). `None` (default) keeps
            every batch: rollback to any point, memory growing with the edits.
        edit_module_template, layer_module_template (`str`, *optional*):
            Overrides for architectures missing from the layout table, e.g. `"model.layers.{}.mlp.down_proj"` and
            `"model.layers.{}"`.
    """

    # algorithm
    algorithm: str = field(default="memit", metadata={"help": f"Editing algorithm: one of {list(ALGORITHM_NAMES)}."})
    algorithm_config: dict[str, Any] | None = field(
        default=None, metadata={"help": "The method's hyperparameters as a mapping (also accepted as flat flags)."}
    )
    layers: list[int] | None = field(default=None, metadata={"help": "Edited decoder layers, ascending."})
    # target values
    v_num_grad_steps: int | None = field(
        default=None, metadata={"help": "Maximum optimisation iterations for z (default per model, 25 generic)."}
    )
    v_lr: float | None = field(default=None, metadata={"help": "Adam learning rate for z."})
    v_weight_decay: float | None = field(default=None, metadata={"help": "Weight of ||delta||/||h||^2."})
    clamp_norm_factor: float | None = field(default=None, metadata={"help": "Max ||delta|| / ||h||."})
    kl_factor: float = field(default=ValueOptimisation.kl_factor, metadata={"help": "Weight of the KL essence term."})
    v_early_stop_loss: float = field(
        default=ValueOptimisation.early_stop_loss, metadata={"help": "Per-request early-stop loss."}
    )
    v_early_stop_margin: float | None = field(
        default=ValueOptimisation.early_stop_margin,
        metadata={"help": "Stop a request once its targets lead every prompt by this log-prob margin (None: off)."},
    )
    v_early_stop_patience: int = field(
        default=ValueOptimisation.early_stop_patience, metadata={"help": "Steps taken after the margin is reached."}
    )
    v_batch_size: int | None = field(
        default=None, metadata={"help": "Requests optimised together per chunk (default: 16 on CPU, 128 on GPU)."}
    )
    v_autocast_dtype: str | None = field(
        default=ValueOptimisation.autocast_dtype,
        metadata={"help": "Autocast dtype of the z forward after the z layer (bfloat16/float16)."},
    )
    v_first_token_weight: float = field(
        default=ValueOptimisation.first_token_weight,
        metadata={"help": "Weight of a target's first token in the z loss relative to each later token."},
    )
    v_norm_anchor: float | None = field(
        default=ValueOptimisation.norm_anchor,
        metadata={"help": "NAS: rescale each value vector (projection output + z delta) to this norm (off: None)."},
    )
    v_norm_anchor_skip: float | None = field(
        default=ValueOptimisation.norm_anchor_skip,
        metadata={"help": "NAS: leave a request whose value norm exceeds this multiple of the anchor unchanged."},
    )
    num_context_templates: int = field(default=5, metadata={"help": "Number of sampled context prefixes."})
    context_template_length: int = field(default=10, metadata={"help": "Token length of each context prefix."})
    context_template_chat: bool | None = field(
        default=None,
        metadata={
            "help": "Also key and optimise the edit inside the tokenizer's chat template (default: when it has one)."
        },
    )
    context_template_chat_forms: list[str] = field(
        default_factory=lambda: ["question", "answer"],
        metadata={"help": "Chat context forms: `answer` (the assistant restates the prompt) and/or `question`."},
    )
    # application
    merge_edits: bool = field(
        default=True, metadata={"help": "Add updates to the weights in place (False: exact float32 output hooks)."}
    )
    keep_history: int | None = field(
        default=None, metadata={"help": "Batches kept for rollback; older ones are consolidated (None: all)."}
    )
    # statistics
    stats_num_tokens: int = field(
        default=StatisticsSettings.num_tokens, metadata={"help": "Token budget of the covariance statistics."}
    )
    stats_max_length: int = field(
        default=StatisticsSettings.max_length, metadata={"help": "Max tokens per statistics text piece."}
    )
    stats_batch_tokens: int = field(
        default=StatisticsSettings.batch_tokens, metadata={"help": "Padded tokens per statistics forward."}
    )
    stats_cache_dir: str | None = field(default=None, metadata={"help": "Statistics cache directory."})
    stats_sample_texts: int = field(
        default=StatisticsSettings.sample_texts, metadata={"help": "Model-sampled texts when no corpus is given."}
    )
    stats_sample_length: int = field(
        default=StatisticsSettings.sample_length, metadata={"help": "Tokens per model-sampled text."}
    )
    stats_checkpoint_every: int | None = field(
        default=None, metadata={"help": "Checkpoint a statistics collection every this many batches (resumable)."}
    )
    stats_checkpoint_seconds: float | None = field(
        default=StatisticsSettings.checkpoint_seconds,
        metadata={"help": "Checkpoint a statistics collection every this many seconds (None: off)."},
    )
    stats_repo: str | None = field(
        default=None, metadata={"help": "Hub dataset repo or folder of statistics to use (checked against the model)."}
    )
    stats_repo_revision: str | None = field(default=None, metadata={"help": "Revision of `stats_repo`."})
    # run
    output_dir: str | None = field(
        default=None, metadata={"help": "Default folder of save_adapter / merge_and_save / save_state and the CLI."}
    )
    seed: int = field(default=42, metadata={"help": "Seed for templates and sampled statistics text."})
    model_init_kwargs: dict[str, Any] | None = field(
        default=None, metadata={"help": "Kwargs of from_pretrained when `model` is a string."}
    )
    push_to_hub: bool = field(
        default=False, metadata={"help": "Also push the saved edit to `hub_model_id` (save_adapter, `memit-hf edit`)."}
    )
    hub_model_id: str | None = field(default=None, metadata={"help": "Repository of `push_to_hub`, `user/name`."})
    hub_private_repo: bool | None = field(default=None, metadata={"help": "Create the repository as private."})
    hub_token: str | None = field(default=None, metadata={"help": "Hub token (default: the logged-in one)."})
    redact_keys: list[str] | None = field(
        default=None, metadata={"help": "Further secret keys redacted wherever arguments are written."}
    )
    edit_module_template: str | None = field(default=None, metadata={"help": "Override, e.g. `h.{}.mlp.proj`."})
    layer_module_template: str | None = field(default=None, metadata={"help": "Override, e.g. `h.{}`."})

    def __post_init__(self):
        if self.algorithm not in ALGORITHM_NAMES:
            raise ValueError(f"`algorithm` must be one of {list(ALGORITHM_NAMES)}, got `{self.algorithm}`.")
        config_class = get_config_class(self.algorithm)
        if isinstance(self.algorithm_config, AlgorithmConfig):
            if not isinstance(self.algorithm_config, config_class):
                raise ValueError(
                    f"`algorithm_config` is a `{type(self.algorithm_config).__name__}` but `algorithm` is "
                    f"`{self.algorithm}` (which takes a `{config_class.__name__}`)."
                )
            self.algorithm_config = self.algorithm_config.to_dict()
        self.algorithm_config = config_class.from_dict(self.algorithm_config).to_dict()
        if self.layers is not None:
            self.layers = [int(layer) for layer in self.layers]
            if not self.layers:
                raise ValueError("`layers` must name at least one layer (or be None for the default).")
            if sorted(set(self.layers)) != self.layers:
                raise ValueError(f"`layers` must be strictly ascending without repeats, got {self.layers}.")
            wanted = config_class.num_layers
            if wanted is not None and len(self.layers) != wanted:
                raise ValueError(
                    f"`algorithm='{self.algorithm}'` edits exactly {wanted} layer(s), got `layers={self.layers}`."
                )
        if self.v_batch_size is not None and self.v_batch_size <= 0:
            raise ValueError(f"`v_batch_size` must be a positive integer, got {self.v_batch_size}.")
        if self.v_autocast_dtype not in (None, "bfloat16", "float16"):
            raise ValueError(
                f"`v_autocast_dtype` must be `bfloat16`, `float16` or None, got `{self.v_autocast_dtype}`."
            )
        if self.v_num_grad_steps is not None and self.v_num_grad_steps <= 0:
            raise ValueError(f"`v_num_grad_steps` must be a positive integer, got {self.v_num_grad_steps}.")
        positive = {
            "stats_num_tokens": self.stats_num_tokens,
            "stats_max_length": self.stats_max_length,
            "stats_batch_tokens": self.stats_batch_tokens,
            "stats_sample_texts": self.stats_sample_texts,
            "stats_sample_length": self.stats_sample_length,
            "context_template_length": self.context_template_length,
        }
        for name, value in positive.items():
            if value is None or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value}.")
        if self.stats_checkpoint_every is not None and self.stats_checkpoint_every <= 0:
            raise ValueError(
                f"`stats_checkpoint_every` must be a positive integer or None, got {self.stats_checkpoint_every}."
            )
        if self.stats_checkpoint_seconds is not None and self.stats_checkpoint_seconds <= 0:
            raise ValueError(
                f"`stats_checkpoint_seconds` must be positive or None, got {self.stats_checkpoint_seconds}."
            )
        if self.keep_history is not None and self.keep_history < 0:
            raise ValueError(f"`keep_history` must be >= 0 or None, got {self.keep_history}.")
        if self.redact_keys is not None:
            self.redact_keys = [str(key) for key in self.redact_keys]
        if self.v_early_stop_patience < 0:
            raise ValueError(f"`v_early_stop_patience` must be >= 0, got {self.v_early_stop_patience}.")
        unknown_forms = [form for form in self.context_template_chat_forms if form not in CHAT_FORMS]
        if unknown_forms:
            raise ValueError(
                f"`context_template_chat_forms` has unknown forms {unknown_forms}; choose from {list(CHAT_FORMS)}."
            )
        if self.num_context_templates < 0:
            raise ValueError(f"`num_context_templates` must be >= 0, got {self.num_context_templates}.")
        for name in ("v_lr", "v_weight_decay", "clamp_norm_factor"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"`{name}` must be non-negative, got {value}.")
        if self.stats_batch_tokens < self.stats_max_length:
            raise ValueError(
                f"`stats_batch_tokens` ({self.stats_batch_tokens}) must be at least `stats_max_length` "
                f"({self.stats_max_length})."
            )

    def value_optimisation(self) -> ValueOptimisation:
        """The settings of the target-value optimisation (see [`~memit_hf.settings.ValueOptimisation`]).

        The Editor calls it on the arguments resolved for its model; a field still at `None` (`v_num_grad_steps`,
        `v_lr`, `v_weight_decay`, `clamp_norm_factor`) takes the `ValueOptimisation` default, and `v_batch_size=None`
        the device default chunk size.

        Returns:
            [`~memit_hf.settings.ValueOptimisation`]
        """
        defaults = ValueOptimisation
        return ValueOptimisation(
            num_steps=defaults.num_steps if self.v_num_grad_steps is None else self.v_num_grad_steps,
            lr=defaults.lr if self.v_lr is None else self.v_lr,
            weight_decay=defaults.weight_decay if self.v_weight_decay is None else self.v_weight_decay,
            clamp_norm_factor=defaults.clamp_norm_factor if self.clamp_norm_factor is None else self.clamp_norm_factor,
            kl_factor=self.kl_factor,
            early_stop_loss=self.v_early_stop_loss,
            early_stop_margin=self.v_early_stop_margin,
            early_stop_patience=self.v_early_stop_patience,
            chunk_size=self.v_batch_size,
            autocast_dtype=self.v_autocast_dtype,
            first_token_weight=self.v_first_token_weight,
            norm_anchor=self.v_norm_anchor,
            norm_anchor_skip=self.v_norm_anchor_skip,
        )

    def statistics_settings(self) -> StatisticsSettings:
        """The settings of the second-moment statistics: the `stats_*` fields, `seed` and `hub_token` (see
        [`~memit_hf.settings.StatisticsSettings`]).

        Returns:
            [`~memit_hf.settings.StatisticsSettings`]
        """
        return StatisticsSettings(
            num_tokens=self.stats_num_tokens,
            max_length=self.stats_max_length,
            batch_tokens=self.stats_batch_tokens,
            cache_dir=self.stats_cache_dir,
            sample_texts=self.stats_sample_texts,
            sample_length=self.stats_sample_length,
            seed=self.seed,
            repo=self.stats_repo,
            repo_revision=self.stats_repo_revision,
            checkpoint_every=self.stats_checkpoint_every,
            checkpoint_seconds=self.stats_checkpoint_seconds,
            hub_token=self.hub_token,
        )

    @property
    def method_config(self) -> AlgorithmConfig:
        """The algorithm's configuration object (e.g. a [`~memit_hf.algorithms.MEMITConfig`])."""
        return get_config_class(self.algorithm).from_dict(self.algorithm_config)

    @classmethod
    def from_flat(cls, values: dict[str, Any], where: str = "the arguments") -> "EditingArguments":
        """Build arguments from a flat mapping whose keys are `EditingArguments` fields or hyperparameters of the
        chosen method (`mom2_update_weight: 5000.0`), as YAML recipes and the command line give them.

        Args:
            values (`dict[str, Any]`): the flat mapping.
            where (`str`, *optional*, defaults to `"the arguments"`): what holds `values`, named in errors.

        Returns:
            `EditingArguments`: the arguments, the method's hyperparameters gathered in `algorithm_config`.

        Raises:
            ValueError: naming keys that are neither, or a hyperparameter of another method.
        """
        values = cls._checked_keys(values, where)
        known = {f.name for f in fields(cls)}
        algorithm = values.get("algorithm", cls.algorithm)
        config_fields = get_config_class(algorithm).field_names() if algorithm in ALGORITHM_NAMES else ()
        method_values = {key: values.pop(key) for key in list(values) if key not in known}
        foreign = sorted(set(method_values) - set(config_fields))
        if foreign:
            raise ValueError(f"{where} sets {foreign}, which are not hyperparameters of `algorithm='{algorithm}'`.")
        if method_values:
            values["algorithm_config"] = {**(values.get("algorithm_config") or {}), **method_values}
        return cls(**values)

    @classmethod
    def _checked_keys(cls, values: dict[str, Any], where: str) -> dict[str, Any]:
        """A copy of the flat mapping `values` whose keys are all fields or method hyperparameters (the one check of
        unknown keys, for recipes and the command line alike). `fact_token: subject_last`, a field of older versions,
        is dropped with a `FutureWarning`."""
        values = dict(values)
        if "fact_token" in values:
            if values["fact_token"] != "subject_last":
                raise ValueError(
                    f"`fact_token` must be `subject_last` (the only edited token), got `{values['fact_token']}` in "
                    f"{where}."
                )
            del values["fact_token"]
            warnings.warn(
                f"`fact_token` is no longer an `EditingArguments` field (the subject's last token is always edited); "
                f"remove `fact_token: subject_last` from {where}.",
                FutureWarning,
                stacklevel=3,
            )
        unknown = sorted(set(values) - {f.name for f in fields(cls)} - set(method_field_names()))
        if unknown:
            raise ValueError(f"Unknown `EditingArguments` keys in {where}: {unknown}.")
        return values

    @classmethod
    def read_recipe(cls, path: str | os.PathLike) -> dict[str, Any]:
        """Read a YAML recipe and check its keys: what [`from_yaml`] builds arguments from and what
        `memit-hf --config` makes the defaults of the command's flags.

        Args:
            path (`str` or `os.PathLike`): the YAML file, a mapping whose keys are `EditingArguments` fields or
                hyperparameters of the registered methods (an empty file is an empty mapping).

        Returns:
            `dict[str, Any]`: the recipe's flat mapping (`fact_token: subject_last` of older recipes dropped with a
            `FutureWarning`).

        Raises:
            OSError: if the file cannot be read.
            ValueError: if it is not a mapping, or names keys that are neither fields nor method hyperparameters
                (naming them and the file).
        """
        with open(path, encoding="utf-8") as handle:
            values = yaml.safe_load(handle)
        if values is None:
            return {}
        if not isinstance(values, dict):
            raise ValueError(
                f"{path} must hold a YAML mapping of `EditingArguments` fields, got a {type(values).__name__}."
            )
        return cls._checked_keys(values, str(path))

    def to_dict(self) -> dict[str, Any]:
        """The arguments as a plain JSON/YAML-serialisable dict, every secret redacted (`hub_token`, a `token` in
        `model_init_kwargs`, the `redact_keys`, any `hf_...` token; see [`~memit_hf.redaction.redact`]): what every
        file memit-hf writes records of them."""
        return redact(asdict(self), self.redact_keys or ())

    def editing_values(self) -> dict[str, Any]:
        """[`to_dict`] without the [`CALLER_FIELDS`]: what a saved editor state records as its hyperparameters."""
        return {key: value for key, value in self.to_dict().items() if key not in CALLER_FIELDS}

    @classmethod
    def from_saved(cls, saved: dict[str, Any], caller: "EditingArguments | None" = None) -> "EditingArguments":
        """Arguments to continue a saved editor state: the editing hyperparameters of `saved` (see
        [`editing_values`]), with every [`CALLER_FIELDS`] field from `caller` (default: the defaults). Nothing of
        `saved` chooses how a model is loaded, where statistics come from or where anything is published.

        Raises:
            ValueError: when `saved` is not a mapping or holds values these arguments refuse (naming the field).
        """
        if not isinstance(saved, dict):
            raise ValueError(f"The saved arguments must be a mapping, got {type(saved).__name__}.")
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in saved.items() if key in known and key not in CALLER_FIELDS}
        caller_values = asdict(caller) if caller is not None else {}
        values.update({key: caller_values[key] for key in CALLER_FIELDS if key in caller_values})
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides: Any) -> "EditingArguments":
        """Load arguments from a YAML recipe (read by [`read_recipe`]) whose keys are field names or hyperparameters
        of the recipe's method; `overrides` win over the file.

        Raises:
            ValueError: if the file is not a mapping or has keys that are neither (see [`read_recipe`] and
                [`from_flat`]).
        """
        values = cls.read_recipe(path)
        values.update(overrides)
        return cls.from_flat(values, where=str(path))

    def to_yaml(self, path: str | os.PathLike) -> None:
        """Write the arguments as a YAML recipe."""
        with open(path, "w", encoding="utf-8") as handle:
            yaml.safe_dump(self.to_dict(), handle, sort_keys=False)
