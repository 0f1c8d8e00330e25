"""Typed settings of the pipeline stages: what the target-value optimisation and the statistics provider read.

[`~memit_hf.EditingArguments`] builds them ([`~memit_hf.EditingArguments.value_optimisation`],
[`~memit_hf.EditingArguments.statistics_settings`]) once the Editor has filled in the per-model defaults; the stages
take them whole instead of a long list of arguments. The field defaults here are the generic defaults of each setting
(`EditingArguments` reads its own defaults from them). This module is torch-free and imports nothing of memit_hf.
"""

from dataclasses import dataclass, field
from numbers import Integral, Real


AUTOCAST_DTYPES = ("bfloat16", "float16")
"""The dtypes the z optimisation can run its blocks after the z layer in (`torch.autocast`)."""

CHAT_FORMS = ("answer", "question")
"""The chat context templates [`~memit_hf.keys.chat_context_templates`] can build: `"answer"`, the prompt sent as a user turn and
restated by the assistant, which completes it with the target (where a chat answer usually names the new object:
"The Eiffel Tower is located in ..."); `"question"`, the prompt sent as a user turn and the target opening the
assistant's answer."""


@dataclass(frozen=True)
class ValueOptimisation:
    """Settings of the target-value (z) optimisation (algorithm.md section 4): per request, Adam on a residual delta
    at the z layer, minimising `mean_prompts(NLL(target)) + kl_factor * KL + weight_decay * ||delta|| / ||h||^2`
    with `||delta||` clamped to `clamp_norm_factor * ||h||`.

    Args:
        num_steps (`int`, *optional*, defaults to `25`):
            Maximum number of optimisation iterations (the last one takes no step, as in the reference).
        lr (`float`, *optional*, defaults to `0.5`):
            Adam learning rate of the residual delta.
        weight_decay (`float`, *optional*, defaults to `0.5`):
            Weight of `||delta|| / ||h||^2`.
        clamp_norm_factor (`float`, *optional*, defaults to `0.75`):
            Maximum `||delta||` as a multiple of `||h||` at the subject's last token.
        kl_factor (`float`, *optional*, defaults to `0.0625`):
            Weight of the KL term keeping "{subject} is a" unchanged.
        early_stop_loss (`float`, *optional*, defaults to `0.05`):
            A request stops once its loss falls below this value.
        early_stop_margin (`float`, *optional*):
            A request also stops `early_stop_patience` iterations after every target token first became the most
            likely token in every one of its prompts by at least this many nats (`None`: only the loss rule).
        early_stop_patience (`int`, *optional*, defaults to `5`):
            Iterations taken after the margin is first reached.
        chunk_size (`int`, *optional*):
            Requests optimised together in one chunk (see [`~memit_hf.values.plan_chunks`]); `None` takes
            [`~memit_hf.values.default_chunk_size`] of the model's device.
        autocast_dtype (`str`, *optional*):
            `"bfloat16"` or `"float16"`: run the blocks after the z layer and the LM head under `torch.autocast` with
            this dtype (the delta, the loss and the Adam state stay float32). `None`: no autocast.
        use_prefix_cache (`bool`, *optional*, defaults to `True`):
            Run only the tokens from the subject's last token on in the blocks after the z layer, with a KV cache of
            the tokens before it (exact; checked on the first chunk and switched off if an architecture fails it).
        first_token_weight (`float`, *optional*, defaults to `1.0`):
            Weight of a target's first token in its prompt's NLL relative to each later token (the weights of a
            prompt's tokens still sum to one): above 1 favours the token greedy decoding must pick first.
        norm_anchor (`float`, *optional*):
            Norm-Anchor Scaling (NAS, https://huggingface.co/papers/2602.02543): rescale each solved value vector
            `v* = v0 + delta` (`v0`: the edited projection's output at the z layer at the subject's last token of the
            bare prompt) to this norm, the mean `||v*||` of the original model (see
            [`~memit_hf.Editor.value_norm_anchor`]), so value norms cannot feed back into the weights edit after
            edit. `None` (the default): off.
        norm_anchor_skip (`float`, *optional*, defaults to `2.0`):
            With `norm_anchor`, a request whose `||v*||` exceeds this multiple of the anchor keeps `v* = v0` (no
            change of its value, as the reference does); `None`: rescale every request.

    Raises:
        ValueError: naming the field, when a value is out of its range.
    """

    num_steps: int = 25
    lr: float = 0.5
    weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    early_stop_loss: float = 0.05
    early_stop_margin: float | None = None
    early_stop_patience: int = 5
    chunk_size: int | None = None
    autocast_dtype: str | None = None
    use_prefix_cache: bool = True
    first_token_weight: float = 1.0
    norm_anchor: float | None = None
    norm_anchor_skip: float | None = 2.0

    def __post_init__(self):
        if not isinstance(self.num_steps, Integral) or self.num_steps <= 0:
            raise ValueError(f"`num_steps` must be a positive integer, got {self.num_steps!r}.")
        if not isinstance(self.first_token_weight, Real) or not self.first_token_weight > 0:
            raise ValueError(f"`first_token_weight` must be a positive number, got {self.first_token_weight!r}.")
        for name in ("lr", "weight_decay", "clamp_norm_factor", "kl_factor"):
            value = getattr(self, name)
            if not isinstance(value, Real) or not value >= 0:
                raise ValueError(f"`{name}` must be a non-negative number, got {value!r}.")
        if not isinstance(self.early_stop_loss, Real):
            raise ValueError(f"`early_stop_loss` must be a number, got {self.early_stop_loss!r}.")
        if self.early_stop_margin is not None and not isinstance(self.early_stop_margin, Real):
            raise ValueError(f"`early_stop_margin` must be a number or None, got {self.early_stop_margin!r}.")
        if not isinstance(self.early_stop_patience, Real) or self.early_stop_patience < 0:
            raise ValueError(f"`early_stop_patience` must be >= 0, got {self.early_stop_patience!r}.")
        if self.chunk_size is not None and (not isinstance(self.chunk_size, Integral) or self.chunk_size <= 0):
            raise ValueError(f"`chunk_size` must be a positive integer or None, got {self.chunk_size!r}.")
        for name in ("norm_anchor", "norm_anchor_skip"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, Real) or not value > 0):
                raise ValueError(f"`{name}` must be a positive number or None, got {value!r}.")
        if self.autocast_dtype is not None and self.autocast_dtype not in AUTOCAST_DTYPES:
            raise ValueError(
                f"`autocast_dtype` must be one of {list(AUTOCAST_DTYPES)} or None, got {self.autocast_dtype!r}."
            )


@dataclass(frozen=True)
class StatisticsSettings:
    """Settings of the second-moment statistics (what [`~memit_hf.statistics.StatisticsProvider`] and
    [`~memit_hf.statistics.statistics_fingerprint`] read). Hashable: the Editor keeps one provider per settings and
    corpus.

    Args:
        num_tokens (`int`, *optional*, defaults to `100000`):
            Token budget of the statistics (part of the fingerprint).
        max_length (`int`, *optional*, defaults to `512`):
            Texts are cut into pieces of at most this many tokens (part of the fingerprint).
        batch_tokens (`int`, *optional*, defaults to `4096`):
            Padded tokens per forward pass while collecting (not part of the fingerprint: the sums do not depend on
            it).
        cache_dir (`str`, *optional*):
            Where statistics are cached; `None`: `$HF_HOME/memit_hf/stats`.
        sample_texts (`int`, *optional*, defaults to `64`):
            Without a corpus, the number of texts sampled from the model itself.
        sample_length (`int`, *optional*, defaults to `128`):
            Token length of each model-sampled text.
        seed (`int`, *optional*, defaults to `42`):
            Seed of the corpus order and of the model-sampled texts (part of the fingerprint).
        repo (`str`, *optional*):
            A Hub dataset repository id or local folder of statistics used instead of collecting them.
        repo_revision (`str`, *optional*):
            Branch, tag or commit of `repo`.
        checkpoint_every (`int`, *optional*):
            Checkpoint a collection after every this many batches (of each process); `None`: not by batches.
        checkpoint_seconds (`float`, *optional*, defaults to `600.0`):
            Checkpoint a collection whenever this many seconds have passed since the last one; `None`: off.
        hub_token (`str`, *optional*):
            Token used to fetch `repo` from the Hub (never shown in the representation).

    Raises:
        ValueError: naming the field, when a value is out of its range.
    """

    num_tokens: int = 100_000
    max_length: int = 512
    batch_tokens: int = 4096
    cache_dir: str | None = None
    sample_texts: int = 64
    sample_length: int = 128
    seed: int = 42
    repo: str | None = None
    repo_revision: str | None = None
    checkpoint_every: int | None = None
    checkpoint_seconds: float | None = 600.0
    hub_token: str | None = field(default=None, repr=False)

    def __post_init__(self):
        for name in ("num_tokens", "max_length", "batch_tokens", "sample_texts", "sample_length"):
            value = getattr(self, name)
            if not isinstance(value, Real) or not value > 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.checkpoint_every is not None and not (
            isinstance(self.checkpoint_every, Real) and self.checkpoint_every > 0
        ):
            raise ValueError(f"`checkpoint_every` must be a positive integer or None, got {self.checkpoint_every!r}.")
        if self.checkpoint_seconds is not None and not (
            isinstance(self.checkpoint_seconds, Real) and self.checkpoint_seconds > 0
        ):
            raise ValueError(f"`checkpoint_seconds` must be positive or None, got {self.checkpoint_seconds!r}.")
        if self.batch_tokens < self.max_length:
            raise ValueError(
                f"`batch_tokens` ({self.batch_tokens}) must be at least `max_length` ({self.max_length})."
            )
