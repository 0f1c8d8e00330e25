"""Target values z: the residual stream after block L that makes each request's target most likely.

All requests of a chunk are optimised together as one `(n, d_model)` delta with per-request clamp, KL reference,
weight-decay denominator and early stop, which reproduces the reference's one-request-at-a-time loop exactly
(algorithm.md sections 4 and 11). Three exact shortcuts keep each step to the compute it needs:

- blocks `0..L` run once per chunk; a step runs only blocks `L+1..` (their forward is swapped for the cached output);
- the positions before each prompt's subject-last token cannot see the delta (causal attention), so their keys and
  values in blocks `L+1..` are computed once and passed as a KV cache; a step runs only the tokens from the
  subject-last token on (and the context templates' own text, which every request's row of a template shares, runs
  once per optimisation into a cache that every chunk's prefix caches start from);
- the LM head runs only at the label positions and at the KL position.

The KV-cache shortcut is checked against a plain forward on the first chunk and switched off (with a warning) if an
architecture's cache handling does not reproduce it.
"""

import copy
import logging
import math
import time
from dataclasses import dataclass, field, replace
from numbers import Integral

import torch
from accelerate import PartialState
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .architectures import ModelLayout, cache_keyword, output_cache, output_logits
from .distributed import assemble_rows, owned_chunks
from .keys import contextualise, continues_a_word
from .modes import frozen_parameters
from .progress import progress_bar
from .requests import EditRequest
from .settings import ValueOptimisation
from .tokenization import encode_targets, encode_texts, last_token_indices, pad_batch, pad_token_id
from .tracing import capture, run_until_stopped, skip_blocks
from .value_norms import anchor_value_norms, projection_outputs


logger = logging.getLogger(__name__)

KL_TEMPLATE = "{} is a"
"""The KL prompt, filled with the subject alone (as the reference does): the KL keeps the next-token distribution
after "{subject}" unchanged."""
PER_REQUEST_FIELDS = ("targets", "initial", "initial_loss", "final_loss", "final_nll", "steps", "final_margin")
"""The per-request tensors of a [`ValueResult`] (one row per request)."""


@dataclass
class ValueResult:
    """Output of [`optimise_target_values`] and [`compute_target_values`].

    Args:
        targets (`torch.Tensor`): `(n, d_model)` float32 target vectors z = h + delta.
        initial (`torch.Tensor`): `(n, d_model)` float32 block-L output h at the subject-last token (bare prompt).
        initial_loss, final_loss (`torch.Tensor`): `(n,)` loss of each request before and after optimisation.
        final_nll (`torch.Tensor`): `(n,)` target NLL part of the final loss.
        steps (`torch.Tensor`): `(n,)` optimisation steps taken per request.
        final_margin (`torch.Tensor`): `(n,)` at the last iteration, the smallest log-probability margin of a target
            token over the most likely other token, across the request's prompts and target tokens (positive: the
            target is the greedy continuation in every prompt).
        schedule (`list`): per chunk, the active requests (positions in the chunk) at every iteration.
        chunks (`list[list[int]]`): the requests (indices into the `requests` given) of every chunk optimised, in
            the order of `schedule` (see [`plan_chunks`]).
        z_layer (`int`, *optional*): the block whose output the targets are.
        chunk_seconds (`list[float]`): per entry of `chunks`, the seconds its optimisation took (its build included).
        chunk_build_seconds (`list[float]`): per entry of `chunks`, the seconds of its build (tokenising its rows,
            blocks `0..L` over them and the prefix caches) before its first step.
        value_norm_ratio (`torch.Tensor`, *optional*): `(n,)` with Norm-Anchor Scaling
            (`ValueOptimisation.norm_anchor`), each request's `||v*||` over the anchor before rescaling (see
            [`~memit_hf.value_norms.anchor_value_norms`]); `None` without it.
    """

    targets: torch.Tensor
    initial: torch.Tensor
    initial_loss: torch.Tensor
    final_loss: torch.Tensor
    final_nll: torch.Tensor
    steps: torch.Tensor
    final_margin: torch.Tensor | None = None
    schedule: list = field(default_factory=list, repr=False)
    chunks: list = field(default_factory=list, repr=False)
    z_layer: int | None = None
    value_norm_ratio: torch.Tensor | None = None
    chunk_seconds: list = field(default_factory=list, repr=False)
    chunk_build_seconds: list = field(default_factory=list, repr=False)


@dataclass
class _Rows:
    """Token lists of a chunk: per request `n_prompts` rewriting prompts (request-major), then the KL prompts that no
    rewriting prompt stands in for (Python lists)."""

    sequences: list[list[int]]
    lookup: list[int]  # subject-last index per row
    row_request: list[int]  # request (0..n-1) of each row
    labels: list[list[tuple[int, int, float]]]  # per row: (column, target id, weight)
    is_kl: list[bool]  # a row of its own for a KL prompt
    n_prompts: int
    kl_row: list[int] = field(default_factory=list)  # per request, the row whose subject-last logits give the KL
    template: list[int] = field(default_factory=list)  # per row, its (flat) context template; -1 for a KL row

    def select(self, requests: list[int]) -> tuple["_Rows", list[int]]:
        """Rows of `requests` (renumbered 0..len-1 in the given order) and their indices in this object."""
        new_index = {r: i for i, r in enumerate(requests)}
        keep = [row for row, r in enumerate(self.row_request) if r in new_index]
        new_row = {row: i for i, row in enumerate(keep)}
        sub = _Rows(
            sequences=[self.sequences[k] for k in keep],
            lookup=[self.lookup[k] for k in keep],
            row_request=[new_index[self.row_request[k]] for k in keep],
            labels=[self.labels[k] for k in keep],
            is_kl=[self.is_kl[k] for k in keep],
            n_prompts=self.n_prompts,
            kl_row=[new_row[self.kl_row[r]] for r in requests],
            template=[self.template[k] for k in keep],
        )
        return sub, keep


@dataclass
class _Batch:
    """Tensors of a `_Rows` object, in full form and split at the subject-last token (prefix | suffix)."""

    input_ids: torch.Tensor  # (rows, T) right-padded full sequences
    attention_mask: torch.Tensor  # (rows, T)
    lookup: torch.Tensor  # (rows,)
    prefix_ids: torch.Tensor  # (rows, P) left-padded tokens before the subject-last token
    prefix_mask: torch.Tensor  # (rows, P)
    suffix_ids: torch.Tensor  # (rows, S) right-padded tokens from the subject-last token on
    suffix_mask: torch.Tensor  # (rows, S)
    suffix_positions: torch.Tensor  # (rows, S)
    row_request: torch.Tensor  # (rows,)
    label_rows: torch.Tensor  # (labels,)
    label_cols: torch.Tensor  # (labels,) column in the full sequence
    label_ids: torch.Tensor  # (labels,)
    label_weight: torch.Tensor  # (labels,) 1 / (len(target) * n_prompts)
    kl_rows: torch.Tensor  # (n,) row of each request's KL prompt, by request

    @property
    def suffix_label_cols(self) -> torch.Tensor:
        return self.label_cols - self.lookup[self.label_rows]


def _rows(
    tokenizer: PreTrainedTokenizerBase,
    requests: list[EditRequest],
    templates: list[str],
    first_token_weight: float = ValueOptimisation.first_token_weight,
) -> _Rows:
    n, n_prompts = len(requests), len(templates)
    spaced = encode_targets(tokenizer, [r.target_new for r in requests])
    unspaced = encode_targets(tokenizer, [r.target_new for r in requests], leading_space=False)
    prompt_ids, prompt_idx = contextualise(tokenizer, requests, templates)
    kl_texts = [KL_TEMPLATE.replace("{}", r.subject, 1) for r in requests]  # the subject alone, not the prompt
    kl_ids = encode_texts(tokenizer, kl_texts)
    kl_idx = last_token_indices(tokenizer, kl_texts, [len(r.subject) for r in requests])
    rows = _Rows([], [], [], [], [], n_prompts)
    for i in range(n):
        for j in range(n_prompts):
            target = spaced[i] if continues_a_word(templates[j]) else unspaced[i]
            total = first_token_weight + len(target) - 1
            weights = [(first_token_weight if k == 0 else 1.0) / (total * n_prompts) for k in range(len(target))]
            ids = prompt_ids[i * n_prompts + j]
            # Position p predicts token p + 1: the last prompt token predicts the first target token.
            rows.labels.append([(len(ids) - 1 + k, t, w) for k, (t, w) in enumerate(zip(target, weights))])
            rows.sequences.append(ids + target[:-1])
            rows.lookup.append(prompt_idx[i * n_prompts + j])
            rows.row_request.append(i)
            rows.is_kl.append(False)
            rows.template.append(j)
    bare = templates.index("{}") if "{}" in templates else None
    for i in range(n):
        # The KL logits are those at the subject-last token of "{subject} is a": when the bare prompt has the same
        # tokens up to its own subject-last token (a prompt that opens with the subject), causal attention makes its
        # logits there the same ones, and the KL prompt needs no row of its own.
        if bare is not None:
            row = i * n_prompts + bare
            if kl_ids[i][: kl_idx[i] + 1] == prompt_ids[row][: prompt_idx[row] + 1]:
                rows.kl_row.append(row)
                continue
        rows.kl_row.append(len(rows.sequences))
        rows.sequences.append(kl_ids[i])
        rows.lookup.append(kl_idx[i])
        rows.row_request.append(i)
        rows.labels.append([])
        rows.is_kl.append(True)
        rows.template.append(-1)
    return rows


def _batch(rows: _Rows, pad: int, device: torch.device, prefix_width: int | None = None) -> _Batch:
    """The tensors of `rows`; the prefixes are left-padded to `prefix_width` (default: the longest prefix)."""
    input_ids, attention_mask = pad_batch(rows.sequences, pad, device)
    prefixes = [seq[:idx] for seq, idx in zip(rows.sequences, rows.lookup)]
    suffixes = [seq[idx:] for seq, idx in zip(rows.sequences, rows.lookup)]
    width = max(len(p) for p in prefixes) if prefix_width is None else prefix_width
    prefix_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prefixes], dtype=torch.long, device=device)
    prefix_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prefixes], device=device)
    prefix_ids, prefix_mask = prefix_ids.reshape(len(prefixes), width), prefix_mask.reshape(len(prefixes), width)
    suffix_ids, suffix_mask = pad_batch(suffixes, pad, device)
    lookup = torch.tensor(rows.lookup, device=device)
    suffix_positions = lookup[:, None] + torch.arange(suffix_ids.shape[1], device=device)
    labels = [(r, c, t, w) for r, row_labels in enumerate(rows.labels) for c, t, w in row_labels]
    kl_rows = rows.kl_row
    return _Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        lookup=lookup,
        prefix_ids=prefix_ids,
        prefix_mask=prefix_mask,
        suffix_ids=suffix_ids,
        suffix_mask=suffix_mask,
        suffix_positions=suffix_positions,
        row_request=torch.tensor(rows.row_request, device=device),
        label_rows=torch.tensor([x[0] for x in labels], device=device),
        label_cols=torch.tensor([x[1] for x in labels], device=device),
        label_ids=torch.tensor([x[2] for x in labels], device=device),
        label_weight=torch.tensor([x[3] for x in labels], dtype=torch.float32, device=device),
        kl_rows=torch.tensor(kl_rows, device=device),
    )


def cache_view(cache):
    """A copy of a KV cache that shares its tensors: a forward that appends to the copy (transformers' dynamic caches
    concatenate into new tensors and rebind them) leaves `cache` as it was, with no tensor copied. Caches without
    per-layer objects are deep-copied."""
    if cache is None:
        return None
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list):
        return copy.deepcopy(cache)
    view = copy.copy(cache)
    view.layers = [copy.copy(layer) for layer in layers]
    return view


class BlockRunner:
    """Runs `model` from block `z_layer + 1` on, given the block-`z_layer` output, with or without a prefix cache.

    Args:
        model (`PreTrainedModel`): the model.
        layout ([`~memit_hf.architectures.ModelLayout`]): its module layout.
        z_layer (`int`): the block whose output is given.
        autocast_dtype (`torch.dtype`, *optional*): run the blocks after `z_layer`, the prefix cache and the LM head
            under `torch.autocast` with this dtype (the inputs, the loss and the optimiser stay float32).
    """

    def __init__(
        self, model: PreTrainedModel, layout: ModelLayout, z_layer: int, autocast_dtype: torch.dtype | None = None
    ):
        self.model = model
        self.blocks = list(model.get_submodule(layout.layers_attr))[: z_layer + 1]
        self.layer_name = layout.layer_name(z_layer)
        self.autocast_dtype = autocast_dtype
        self.template_output = None

    @property
    def bucket_overhead(self) -> int:
        """The cost of one more forward of the blocks, in tokens: [`row_bucket_overhead`] of the model's device and
        block size."""
        block_parameters = sum(p.numel() for p in self.blocks[-1].parameters())
        return row_bucket_overhead(self.model.device, block_parameters)

    def autocast(self):
        """The autocast context of the blocks after `z_layer` (a no-op without `autocast_dtype`)."""
        device_type = self.model.device.type
        return torch.autocast(device_type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    @torch.no_grad()
    def block_output(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Block-`z_layer` output `(rows, seq, d_model)`, running only blocks `0..z_layer`."""
        block = self.model.get_submodule(self.layer_name)

        def keep_container(module, args, output):
            self.template_output = output

        handle = block.register_forward_hook(keep_container, prepend=True)
        try:
            with capture(self.model, outputs=[self.layer_name], stop_after=self.layer_name) as store:
                run_until_stopped(
                    lambda: self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
                )
        finally:
            handle.remove()
        return store["out:" + self.layer_name].to(input_ids.device)  # block L may sit on another device

    @torch.no_grad()
    def prefix_cache(self, prefix_ids: torch.Tensor, prefix_mask: torch.Tensor, past=None):
        """KV cache of every block over `(rows, P)` prefix tokens and their mask (None when `P == 0`). With `past`, a
        cache of their first columns (see [`TemplatePrefixes`]), only the columns after them run, attending to it; the
        result holds every column."""
        width = prefix_ids.shape[1]
        if width == 0:
            return None
        past_width = past.get_seq_length() if past is not None else 0
        if past_width == width:
            return past
        positions = (prefix_mask.cumsum(1) - 1).clamp_min(0)
        with self.autocast():
            base_model = self.model.base_model
            output = base_model(
                input_ids=prefix_ids[:, past_width:],
                attention_mask=prefix_mask,
                position_ids=positions[:, past_width:],
                use_cache=True,
                **{cache_keyword(base_model): past},
            )
        return output_cache(output)

    def final_hidden(self, batch: _Batch, hidden: torch.Tensor, cache=None, use_cache: bool = True) -> torch.Tensor:
        """Final (normed) hidden states when block `z_layer` outputs `hidden`.

        With `use_cache`, `hidden` is `(rows, S, d)` over the suffix tokens and the result covers the suffix;
        otherwise both cover the full sequences. `cache` itself is left unchanged.
        """
        with skip_blocks(self.blocks, lambda: hidden, self.template_output), self.autocast():
            if not use_cache:
                return self.model.base_model(
                    input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
                ).last_hidden_state
            mask = torch.cat([batch.prefix_mask, batch.suffix_mask], dim=1)
            base_model = self.model.base_model
            return base_model(
                input_ids=batch.suffix_ids,
                attention_mask=mask if cache is not None else batch.suffix_mask,
                position_ids=batch.suffix_positions,
                use_cache=cache is not None,
                **{cache_keyword(base_model): cache_view(cache)},
            ).last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM-head logits (float32) of final hidden states, under the runner's autocast."""
        with self.autocast():
            return lm_logits(self.model, hidden).to(hidden.device)


def lm_logits(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """LM-head logits (float32) for final hidden states, with the model's logit soft-capping if it has one
    ([`~memit_hf.architectures.output_logits`] in float32)."""
    return output_logits(model, hidden, torch.float32)


def _adam_update(delta, grad, exp_avg, exp_avg_sq, step: int, lr: float, betas=(0.9, 0.999), eps=1e-8):
    """One step of `torch.optim.Adam` (default settings) on the given rows, in place."""
    exp_avg.mul_(betas[0]).add_(grad, alpha=1 - betas[0])
    exp_avg_sq.mul_(betas[1]).addcmul_(grad, grad, value=1 - betas[1])
    bias_correction1 = 1 - betas[0] ** step
    bias_correction2 = 1 - betas[1] ** step
    denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
    delta.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


@dataclass
class TemplatePrefixes:
    """The KV cache of the context templates' own text, before the prompt (a sampled prefix, or the system prompt and
    turn markers of a chat template): every request's row of a template opens with the same tokens, so their keys and
    values are computed once per z optimisation and shared by the prefix caches of every chunk (only each row's own
    prefix tokens, from the prompt on, then run). A row whose tokens do not open with its template's tokens (a
    tokenizer that merges across the boundary) keeps its whole prefix as its own.

    Build it with [`TemplatePrefixes.build`].

    Args:
        ids (`list[list[int]]`): per (flat) template, the tokens of its text before the first `{}` (trailing white
            space removed, so the prompt's first word keeps its leading space); empty when not shared.
        cache_row (`list[int]`): per template, its row in `cache` (-1 when not shared; templates with the same text
            share a row).
        width (`int`): the columns of `cache`: the longest shared text, the shorter ones left-padded.
        cache: the KV cache of every block over the shared texts.
    """

    ids: list[list[int]]
    cache_row: list[int]
    width: int
    cache: object

    @classmethod
    def build(
        cls, runner: "BlockRunner", tokenizer: PreTrainedTokenizerBase, templates: list[str]
    ) -> "TemplatePrefixes | None":
        """The shared prefixes of the (flat) `templates` on `runner`'s model; `None` when no template has text of at
        least two tokens before its prompt (nothing worth sharing)."""
        texts = [template.split("{}")[0].rstrip() for template in templates]
        encoded = [encode_texts(tokenizer, [text])[0] if text else [] for text in texts]
        distinct: dict[tuple[int, ...], int] = {}
        ids, cache_row = [], []
        for tokens in encoded:
            if len(tokens) < 2:
                ids.append([])
                cache_row.append(-1)
                continue
            ids.append(tokens)
            cache_row.append(distinct.setdefault(tuple(tokens), len(distinct)))
        if not distinct:
            return None
        width = max(map(len, distinct))
        pad = pad_token_id(tokenizer)
        device = runner.model.device
        rows = list(distinct)
        prefix_ids = torch.tensor([[pad] * (width - len(r)) + list(r) for r in rows], device=device)
        prefix_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        return cls(ids, cache_row, width, runner.prefix_cache(prefix_ids, prefix_mask))

    def shared_tokens(self, rows: _Rows) -> list[int]:
        """Per row of `rows`, how many of its first tokens are its template's shared tokens (0 when it does not open
        with them, or has none)."""
        counts = []
        for sequence, lookup, template in zip(rows.sequences, rows.lookup, rows.template):
            tokens = self.ids[template] if template >= 0 else []
            shared = len(tokens) if tokens and len(tokens) <= lookup and sequence[: len(tokens)] == tokens else 0
            counts.append(shared)
        return counts


def sliding_window_binds(model: PreTrainedModel, row_width: int, prefixes: TemplatePrefixes) -> bool:
    """Whether a sliding-window attention layer of `model` could mask a real token of a row laid out with shared
    template tokens (their cache is as wide as the longest shared text, so a row's own tokens may sit further from
    its shared ones than in the text, and a window counts cache columns): true when the model's `sliding_window` is
    not wider than the row's full width plus the shared cache's."""
    window = getattr(model.config, "sliding_window", None)
    return isinstance(window, int) and window <= row_width + prefixes.width


class ZChunk:
    """The z problem of one chunk of requests: its prompts (per request the context-formatted rewriting prompts and
    the KL prompt), their block-L outputs, and a forward from block L+1 with a delta per request.

    Build it with [`ZChunk.build`]; [`select`] keeps some of its requests without recomputing anything (the prefix
    cache is sliced by row), as the optimisation does when requests stop.
    """

    def __init__(
        self,
        runner: BlockRunner,
        rows: _Rows,
        hidden_full: torch.Tensor,
        pad: int,
        use_cache: bool,
        buckets: list[tuple] | None = None,  # (rows, prefix cache[, its prefix layout]) per bucket
        prefix_width: int | None = None,
        bucket_overhead: int | None = None,
        prefixes: TemplatePrefixes | None = None,
    ):
        device = runner.model.device
        self.runner, self.rows, self.pad, self.use_cache = runner, rows, pad, use_cache
        self.shared = [0] * len(rows.lookup)
        if (
            prefixes is not None
            and use_cache
            and not sliding_window_binds(runner.model, hidden_full.shape[1], prefixes)
        ):
            self.shared = prefixes.shared_tokens(rows)
        self.prefixes = prefixes
        self.batch = _batch(rows, pad, device, prefix_width)
        self.hidden_full = hidden_full  # (rows, T, d) block-L output of `rows`
        b = self.batch
        self.buckets: list[RowBucket] = []
        if use_cache:
            columns = (b.lookup[:, None] + torch.arange(b.suffix_ids.shape[1], device=b.lookup.device)).clamp(
                max=hidden_full.shape[1] - 1
            )
            self.hidden = hidden_full.gather(1, columns[:, :, None].expand(-1, -1, hidden_full.shape[2]))  # (rows,S,d)
            self.delta_cols = torch.zeros_like(b.lookup)
            self.label_cols = b.suffix_label_cols
            self.kl_cols = torch.zeros_like(b.kl_rows)
            if buckets is None:
                overhead = runner.bucket_overhead if bucket_overhead is None else bucket_overhead
                lengths = [len(seq) - start for seq, start in zip(rows.sequences, rows.lookup)]
                buckets = [(members, None) for members in plan_chunk_buckets(rows.lookup, lengths, overhead)]
            self.buckets = [self._bucket(*bucket) for bucket in buckets]
            order = torch.tensor([row for bucket in self.buckets for row in bucket.rows.tolist()], device=device)
            self.inverse = None  # the rows in bucket order are the chunk's rows in order (one bucket)
            if not torch.equal(order, torch.arange(len(order), device=device)):
                self.inverse = torch.empty_like(order)
                self.inverse[order] = torch.arange(len(order), device=device)
        else:
            self.hidden = hidden_full[:, : b.input_ids.shape[1]]
            self.delta_cols = b.lookup
            self.label_cols = b.label_cols
            self.kl_cols = b.lookup[b.kl_rows]

    def _bucket(self, members: list[int], cache, layout: tuple[int, int] | None = None) -> "RowBucket":
        """The bucket of rows `members`: their suffixes cut to the longest of them; their prefixes in two left-padded
        parts, the template's shared tokens (as wide as the [`TemplatePrefixes`] cache, whose rows the bucket's cache
        starts from; width 0 when no row of the bucket shares any) and each row's own tokens (as wide as the longest);
        and their prefix cache (computed when `cache` is None; `layout`, the two widths, is then that of `cache`).
        Chat rows' prefixes (system prompt, turn markers) are several times longer than the other rows': padded to the
        chunk's longest prefix, the other buckets' caches would run mostly padding."""
        b, rows = self.batch, self.rows
        index = torch.tensor(members, device=b.lookup.device)
        width = max(1, int(b.suffix_mask[index].sum(1).max()))
        shared = [self.shared[r] for r in members]
        if layout is None:
            shared_width = self.prefixes.width if any(shared) else 0
            own_width = max(rows.lookup[r] - (s if shared_width else 0) for r, s in zip(members, shared))
        else:
            shared_width, own_width = layout
        if not shared_width:
            shared = [0] * len(members)
        prefix_ids, prefix_mask = [], []
        for r, s in zip(members, shared):
            prefix = rows.sequences[r][: rows.lookup[r]]
            own = len(prefix) - s
            prefix_ids.append(
                [self.pad] * (shared_width - s) + prefix[:s] + [self.pad] * (own_width - own) + prefix[s:]
            )
            prefix_mask.append([0] * (shared_width - s) + [1] * s + [0] * (own_width - own) + [1] * own)
        device = b.lookup.device
        prefix_ids = torch.tensor(prefix_ids, dtype=torch.long, device=device).reshape(len(members), -1)
        prefix_mask = torch.tensor(prefix_mask, dtype=torch.long, device=device).reshape(len(members), -1)
        batch = replace(
            b,
            prefix_ids=prefix_ids,
            prefix_mask=prefix_mask,
            suffix_ids=b.suffix_ids[index, :width],
            suffix_mask=b.suffix_mask[index, :width],
            suffix_positions=b.suffix_positions[index, :width],
        )
        if cache is None:
            past = None
            if shared_width:
                past = cache_view(self.prefixes.cache)
                template_rows = [
                    self.prefixes.cache_row[rows.template[r]] if s else 0 for r, s in zip(members, shared)
                ]
                past.batch_select_indices(torch.tensor(template_rows, device=device))
            cache = self.runner.prefix_cache(prefix_ids, prefix_mask, past)
        return RowBucket(index, width, batch, cache, (shared_width, own_width))

    @property
    def prefix_tokens(self) -> int:
        """The prefix tokens (padding included) whose KV cache the chunk's buckets hold."""
        return sum(int(bucket.batch.prefix_ids.numel()) for bucket in self.buckets)

    @classmethod
    def build(
        cls,
        runner: BlockRunner,
        tokenizer: PreTrainedTokenizerBase,
        requests: list[EditRequest],
        templates: list[str],
        use_cache: bool = True,
        first_token_weight: float = ValueOptimisation.first_token_weight,
        bucket_overhead: int | None = None,
        prefixes: TemplatePrefixes | None = None,
    ) -> "ZChunk":
        """The chunk of `requests` with the (flat) context `templates`; runs blocks `0..L` once over its prompts.

        Args:
            runner ([`BlockRunner`]): the model runner at the z layer.
            tokenizer (`PreTrainedTokenizerBase`): the tokenizer.
            requests (`list[EditRequest]`): the chunk's requests.
            templates (`list[str]`): the context templates, flattened.
            use_cache (`bool`, *optional*, defaults to `True`): run only the tokens from the subject on, with a KV
                cache of the tokens before it.
            first_token_weight (`float`, *optional*, defaults to `1.0`): weight of each target's first token in its
                prompt's NLL relative to each later token (see [`~memit_hf.settings.ValueOptimisation`]).
            bucket_overhead (`int`, *optional*): the cost of one more forward in tokens, which [`plan_row_buckets`]
                trades against padding (default: the runner's [`BlockRunner.bucket_overhead`]; a very large value
                runs every row in one forward).
            prefixes ([`TemplatePrefixes`], *optional*): the shared prefixes of `templates` on this model (computed
                once by the caller for all its chunks); built here when `None` and `use_cache`.
        """
        rows = _rows(tokenizer, requests, templates, first_token_weight)
        pad = pad_token_id(tokenizer)
        device = runner.model.device
        full = _batch(rows, pad, device)
        overhead = runner.bucket_overhead if bucket_overhead is None else bucket_overhead
        hidden = block_outputs(runner, full.input_ids, full.attention_mask, overhead)
        if use_cache and prefixes is None:
            prefixes = TemplatePrefixes.build(runner, tokenizer, templates)
        return cls(runner, rows, hidden, pad, use_cache, bucket_overhead=overhead, prefixes=prefixes)

    @property
    def num_requests(self) -> int:
        return max(self.rows.row_request) + 1

    def select(self, requests: list[int]) -> "ZChunk":
        """The chunk of `requests` (indices into this chunk, renumbered in the given order), sharing this chunk's
        block-L outputs, row buckets and prefix cache rows."""
        rows, keep = self.rows.select(requests)
        index = torch.tensor(keep, device=self.hidden_full.device)
        if not self.use_cache:
            return ZChunk(self.runner, rows, self.hidden_full[index], self.pad, self.use_cache)
        position = {old: new for new, old in enumerate(keep)}
        buckets = []
        for bucket in self.buckets:
            local = [k for k, old in enumerate(bucket.rows.tolist()) if old in position]
            if not local:
                continue
            cache = None
            if bucket.cache is not None:
                cache = cache_view(bucket.cache)
                cache.batch_select_indices(torch.tensor(local, device=bucket.rows.device))
            buckets.append(([position[int(bucket.rows[k])] for k in local], cache, bucket.prefix_layout))
        width = self.batch.prefix_ids.shape[1]
        return ZChunk(
            self.runner, rows, self.hidden_full[index], self.pad, True, buckets, width, prefixes=self.prefixes
        )

    def forward(self, delta_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Final hidden states at the label positions `(labels, d)` and at the KL positions `(n, d)` when each
        request's delta `(n, d)` is added to block L's output at its rows' subject-last tokens. With the prefix
        cache, each row bucket runs as its own forward, padded to its own longest suffix."""
        b = self.batch
        rows = torch.arange(len(b.lookup), device=b.lookup.device)
        hidden = self.hidden.to(delta_rows.dtype).index_put(
            (rows, self.delta_cols), delta_rows[b.row_request], accumulate=True
        )
        hidden = hidden.to(self.hidden.dtype)
        if not self.use_cache:
            final = self.runner.final_hidden(b, hidden, None, use_cache=False).to(hidden.device)
        else:
            pieces = []
            for bucket in self.buckets:
                piece = self.runner.final_hidden(bucket.batch, hidden[bucket.rows, : bucket.width], bucket.cache)
                # From the last block's device (a dispatched model) to the inputs', padded back to the chunk's width.
                pieces.append(
                    torch.nn.functional.pad(piece.to(hidden.device), (0, 0, 0, hidden.shape[1] - bucket.width))
                )
            final = torch.cat(pieces) if self.inverse is None else torch.cat(pieces)[self.inverse]
        return final[b.label_rows, self.label_cols], final[b.kl_rows, self.kl_cols]


def block_outputs(
    runner: BlockRunner, input_ids: torch.Tensor, attention_mask: torch.Tensor, overhead: int
) -> torch.Tensor:
    """Block-`z_layer` outputs `(rows, T, d)` of right-padded rows, the rows run in length buckets
    ([`plan_row_buckets`]) so that short rows are not padded to the longest (chat rows). Positions past a row's end
    are masked wherever they are used: they hold zeros when the rows ran in several buckets, the padding tokens'
    outputs otherwise.

    Args:
        runner ([`BlockRunner`]): the model runner at the z layer.
        input_ids (`torch.Tensor`), attention_mask (`torch.Tensor`): `(rows, T)` right-padded rows.
        overhead (`int`): the cost of one more forward, in tokens (see [`row_bucket_overhead`]).

    Returns:
        `torch.Tensor`: `(rows, T, d)` block-`z_layer` outputs.
    """
    lengths = attention_mask.sum(1).tolist()
    buckets = plan_row_buckets(lengths, overhead)
    if len(buckets) <= 1:
        return runner.block_output(input_ids, attention_mask)
    hidden = None
    for members in buckets:
        index = torch.tensor(members, device=input_ids.device)
        width = max(1, max(lengths[i] for i in members))
        output = runner.block_output(input_ids[index, :width], attention_mask[index, :width])
        if hidden is None:
            hidden = output.new_zeros(input_ids.shape[0], input_ids.shape[1], output.shape[2])
        hidden[index, :width] = output
    return hidden


@dataclass
class RowBucket:
    """Rows of a [`ZChunk`] that run together in the blocks after the z layer (see [`plan_row_buckets`]).

    Args:
        rows (`torch.Tensor`): `(r,)` the rows (indices into the chunk's rows).
        width (`int`): the suffix tokens they are padded to (the longest of their suffixes).
        batch (`_Batch`): their prefix tensors and their suffix tensors cut to `width`.
        cache: their prefix KV cache (`None` when no row has a prefix).
        prefix_layout (`tuple[int, int]`): the widths of the two parts of their prefixes: the templates' shared tokens
            (0 when none is shared) and each row's own tokens.
    """

    rows: torch.Tensor
    width: int
    batch: _Batch
    cache: object = None
    prefix_layout: tuple[int, int] = (0, 0)


CPU_FORWARD_OVERHEAD = 1.4e8
"""The fixed cost of one forward of the blocks on a CPU, in tokens times parameters of a block: measured on
SmolLM2-135M (3.5M parameters a block) on 2 cores, a forward of 22 blocks takes about 50 ms plus 1.2 ms a token, so
one more forward costs as much as 40 tokens."""


def row_bucket_overhead(device: torch.device, block_parameters: int | None = None) -> int:
    """The cost of one more forward in the z optimisation, in tokens, that [`plan_row_buckets`] trades against
    padding. On a CPU, where the time of a forward is a fixed dispatch cost plus a cost per token that grows with the
    size of a block: `CPU_FORWARD_OVERHEAD / block_parameters` within [8, 256] (40 for SmolLM2-135M, about 9 for a
    0.5B model), 40 when the block size is not given; 256 on an accelerator (where a forward has a fixed launch cost
    and padding is cheap).

    Args:
        device (`torch.device`): the model's device.
        block_parameters (`int`, *optional*): the parameters of one transformer block.

    Returns:
        `int`: the overhead in tokens.
    """
    if device.type != "cpu":
        return 256
    if not block_parameters:
        return 40
    return max(8, min(256, round(CPU_FORWARD_OVERHEAD / block_parameters)))


def plan_row_buckets(lengths: list[int], overhead: int) -> list[list[int]]:
    """Group rows into buckets, each run as one forward padded to its longest row, with the least total cost
    `sum(rows_in_bucket * longest_in_bucket + overhead)` (a dynamic programme over the rows sorted by length, cut only
    between different lengths). Chat rows, whose suffix after the subject runs through the turn markers, are much
    longer than the other rows of a request: in one forward every row would be padded to them.

    Args:
        lengths (`list[int]`): per row, the tokens it runs (its suffix from the subject's last token on).
        overhead (`int`): the cost of one more forward, in tokens (>= 0).

    Returns:
        `list[list[int]]`: the buckets (row indices, increasing), shortest rows first; one bucket of every row when
        the overhead outweighs every saving, none when `lengths` is empty.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    if not order:
        return []
    ordered = [lengths[i] for i in order]
    ends = [k + 1 for k in range(len(order)) if k + 1 == len(order) or ordered[k + 1] != ordered[k]]
    cost, previous = {0: 0}, {0: 0}
    for end in ends:
        cost[end], previous[end] = min(
            (cost[start] + (end - start) * ordered[end - 1] + overhead, start) for start in cost if start < end
        )
    cuts, end = [], len(order)
    while end:
        cuts.append((previous[end], end))
        end = previous[end]
    return [sorted(order[start:end]) for start, end in reversed(cuts)]


PREFIX_PASSES = 50
"""How many times a row's suffix runs through the blocks (forward and backward of every z step, up to 25 steps) for
each time its prefix runs (once, into the KV cache): a padded suffix token costs about this many padded prefix tokens."""


def plan_chunk_buckets(prefix_lengths: list[int], suffix_lengths: list[int], overhead: int) -> list[list[int]]:
    """The row buckets of a z chunk: rows are first grouped by prefix length ([`plan_row_buckets`] with the overhead
    of a bucket over all the z steps, `PREFIX_PASSES * overhead`, so only very different prefixes part: chat rows,
    whose system prompt and turn markers precede the subject, from plain ones), then each group by suffix length. A
    bucket's prefix cache is padded to its longest prefix; its suffix, run at every step, to its longest suffix.

    Args:
        prefix_lengths (`list[int]`): per row, the tokens before its subject's last token (its prefix).
        suffix_lengths (`list[int]`): per row, the tokens from its subject's last token on (its suffix).
        overhead (`int`): the cost of one more forward, in tokens (see [`row_bucket_overhead`]).

    Returns:
        `list[list[int]]`: the buckets (row indices, increasing within a bucket); every row is in exactly one.
    """
    buckets = []
    for group in plan_row_buckets(prefix_lengths, PREFIX_PASSES * overhead):
        for members in plan_row_buckets([suffix_lengths[i] for i in group], overhead):
            buckets.append([group[k] for k in members])
    return buckets


def default_chunk_size(device: torch.device) -> int:
    """Requests per z-optimisation chunk when none is set: 16 on a CPU (where larger chunks run slower per request),
    128 on an accelerator (where larger chunks keep it busy; a chunk that does not fit is split).

    Args:
        device (`torch.device`): the model's device.

    Returns:
        `int`: the chunk size.
    """
    return 16 if device.type == "cpu" else 128


def optimise_target_values(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    layout: ModelLayout,
    requests: list[EditRequest],
    templates: list[list[str]],
    z_layer: int,
    settings: ValueOptimisation,
    *,
    process_state: PartialState | None = None,
    show_progress: bool = True,
    prefix_cache_checked: bool = False,
) -> ValueResult:
    """Optimise the target vector z of every request at block `z_layer` (algorithm.md section 4).

    The loss of request i is `mean_prompts(NLL(target)) + kl_factor * KL(p || p0) + weight_decay * ||d_i|| /
    ||h_i||^2`; each request takes Adam steps until its loss falls below `early_stop_loss` (or the margin rule of
    [`StopRule`] stops it) or `num_steps` iterations have run (the last takes no step), with `||d_i||` clamped to
    `clamp_norm_factor * ||h_i||`. The requests run in the chunks of [`plan_chunks`] (planned once, here), one chunk
    after another.

    Args:
        model (`PreTrainedModel`), tokenizer (`PreTrainedTokenizerBase`): the model and its tokenizer.
        layout ([`~memit_hf.architectures.ModelLayout`]): the model's module layout.
        requests (`list[EditRequest]`): the requests.
        templates (`list[list[str]]`): context templates from [`~memit_hf.keys.generate_context_templates`].
        z_layer (`int`): the block whose output the targets are.
        settings ([`~memit_hf.settings.ValueOptimisation`]): the optimisation settings (`chunk_size=None`: the
            [`default_chunk_size`] of the model's device).
        process_state (`accelerate.PartialState`, *optional*): with several processes, each optimises its own chunks
            (dealt whole by [`~memit_hf.distributed.owned_chunks`]) and every process gets all results; each chunk is
            computed exactly as a single process computes it. `None`: this process optimises every chunk.
        show_progress (`bool`, *optional*, defaults to `True`): show a progress bar.
        prefix_cache_checked (`bool`, *optional*, defaults to `False`): `settings.use_prefix_cache` was already
            checked for this model by [`prefix_cache_supported`] (an editor checks once, not at every call); by
            default the KV-cache shortcut is checked on the first two requests and switched off if it fails.

    Returns:
        [`ValueResult`]: the per-request tensors in the order of `requests`, on every process; `schedule` and
        `chunks` per chunk optimised (in plan order with one process, sorted by their members with several).
    """
    chunk_size = settings.chunk_size if settings.chunk_size is not None else default_chunk_size(model.device)
    single = process_state is None or process_state.num_processes == 1
    with frozen_parameters(model):
        plan = plan_chunks(tokenizer, requests, chunk_size)
        mine = list(range(len(plan))) if single else owned_chunks(len(plan), process_state)
        selected = [plan[i] for i in mine]
        if not prefix_cache_checked:
            settings = with_checked_prefix_cache(
                BlockRunner(model, layout, z_layer), tokenizer, requests, templates, settings
            )
        local = _optimise_chunks(
            model, tokenizer, layout, requests, templates, z_layer, settings, selected, show_progress=show_progress
        )
    if single:
        return with_norm_anchor(model, tokenizer, layout, requests, _in_request_order(local, plan), z_layer, settings)
    from accelerate.utils import gather_object

    indices = [i for chunk in mine for i in plan[chunk]]
    hidden = model.get_input_embeddings().weight.shape[1]
    tensors = {name: getattr(local, name) for name in PER_REQUEST_FIELDS}
    for name in ("targets", "initial"):
        tensors[name] = tensors[name].reshape(len(indices), hidden)
    full = assemble_rows(len(requests), indices, tensors, process_state)
    pieces = sorted(
        gather_object(list(zip(local.chunks, local.schedule, local.chunk_seconds, local.chunk_build_seconds)))
    )
    if process_state.is_main_process:
        logger.info(
            "Optimised the target values of %d requests on %d processes.", len(requests), process_state.num_processes
        )
    result = ValueResult(
        **full,
        schedule=[piece[1] for piece in pieces],
        chunks=[piece[0] for piece in pieces],
        z_layer=z_layer,
        chunk_seconds=[piece[2] for piece in pieces],
        chunk_build_seconds=[piece[3] for piece in pieces],
    )
    return with_norm_anchor(model, tokenizer, layout, requests, result, z_layer, settings)


def with_norm_anchor(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    layout: ModelLayout,
    requests: list[EditRequest],
    values: ValueResult,
    z_layer: int,
    settings: ValueOptimisation,
) -> ValueResult:
    """`values` (in request order, at block `z_layer`) with Norm-Anchor Scaling applied when `settings.norm_anchor` is set (see
    [`~memit_hf.value_norms.anchor_value_norms`]), else `values` itself.

    Raises:
        ValueError: for an architecture whose projection output is normalised before the residual stream.
    """
    if settings.norm_anchor is None:
        return values
    v0 = projection_outputs(model, tokenizer, layout, requests, z_layer)
    targets, ratio = anchor_value_norms(
        values.targets, values.initial, v0, settings.norm_anchor, settings.norm_anchor_skip
    )
    return replace(values, targets=targets, value_norm_ratio=ratio)


def compute_target_values(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    layout: ModelLayout,
    requests: list[EditRequest],
    templates: list[list[str]],
    z_layer: int,
    *,
    num_steps: int = ValueOptimisation.num_steps,
    lr: float = ValueOptimisation.lr,
    weight_decay: float = ValueOptimisation.weight_decay,
    clamp_norm_factor: float = ValueOptimisation.clamp_norm_factor,
    kl_factor: float = ValueOptimisation.kl_factor,
    early_stop_loss: float = ValueOptimisation.early_stop_loss,
    early_stop_margin: float | None = ValueOptimisation.early_stop_margin,
    early_stop_patience: int = ValueOptimisation.early_stop_patience,
    batch_size: int | None = ValueOptimisation.chunk_size,
    use_prefix_cache: bool = ValueOptimisation.use_prefix_cache,
    show_progress: bool = True,
    chunks: list[int] | None = None,
    autocast_dtype: torch.dtype | str | None = None,
    first_token_weight: float = ValueOptimisation.first_token_weight,
    norm_anchor: float | None = ValueOptimisation.norm_anchor,
    norm_anchor_skip: float | None = ValueOptimisation.norm_anchor_skip,
) -> ValueResult:
    """Optimise the target vector z of every request at block `z_layer`, with the settings as keyword arguments:
    [`optimise_target_values`] with the [`~memit_hf.settings.ValueOptimisation`] of these values (the defaults are
    its defaults), optionally on some chunks of the plan only.

    Args:
        num_steps, lr, weight_decay, clamp_norm_factor, kl_factor, early_stop_loss, early_stop_margin,
            early_stop_patience, use_prefix_cache, first_token_weight, norm_anchor, norm_anchor_skip: see
            [`~memit_hf.settings.ValueOptimisation`].
        templates (`list[list[str]]`): context templates from [`~memit_hf.keys.generate_context_templates`].
        batch_size (`int`, *optional*): requests per chunk (`ValueOptimisation.chunk_size`); `None`: the
            [`default_chunk_size`] of the model's device.
        chunks (`list[int]`, *optional*): optimise only these chunks of the plan (indices into [`plan_chunks`] with
            `batch_size`); the result then holds their requests in the order of the chunks' members, not in request
            order. A chunk's result does not depend on which other chunks run, so processes can share the chunks
            (see [`~memit_hf.distributed.owned_chunks`], or let [`optimise_target_values`] do it). Not with
            `norm_anchor` (the anchoring applies to whole results: call [`with_norm_anchor`] on them).
        autocast_dtype (`torch.dtype` or `str`, *optional*): `torch.bfloat16` / `torch.float16` (or their names):
            run blocks `L+1..` and the LM head under `torch.autocast` with this dtype (see [`BlockRunner`]); the
            delta, the loss and the Adam state stay float32.

    Returns:
        [`ValueResult`]

    Raises:
        ValueError: naming the argument (by its `ValueOptimisation` field), when a value is out of its range.
    """
    if batch_size is not None and not (isinstance(batch_size, Integral) and batch_size > 0):
        raise ValueError(f"`batch_size` must be a positive integer or None, got {batch_size!r}.")
    if isinstance(autocast_dtype, torch.dtype):
        autocast_dtype = str(autocast_dtype).removeprefix("torch.")
    settings = ValueOptimisation(
        num_steps=num_steps,
        lr=lr,
        weight_decay=weight_decay,
        clamp_norm_factor=clamp_norm_factor,
        kl_factor=kl_factor,
        early_stop_loss=early_stop_loss,
        early_stop_margin=early_stop_margin,
        early_stop_patience=early_stop_patience,
        chunk_size=batch_size,
        autocast_dtype=autocast_dtype,
        use_prefix_cache=use_prefix_cache,
        first_token_weight=first_token_weight,
        norm_anchor=norm_anchor,
        norm_anchor_skip=norm_anchor_skip,
    )
    if chunks is None:
        return optimise_target_values(
            model, tokenizer, layout, requests, templates, z_layer, settings, show_progress=show_progress
        )
    if norm_anchor is not None:
        raise ValueError("`norm_anchor` applies to whole results, not to `chunks`: call `with_norm_anchor` on them.")
    chunk_size = batch_size if batch_size is not None else default_chunk_size(model.device)
    with frozen_parameters(model):
        selected = [plan_chunks(tokenizer, requests, chunk_size)[i] for i in chunks]
        settings = with_checked_prefix_cache(
            BlockRunner(model, layout, z_layer), tokenizer, requests, templates, settings
        )
        return _optimise_chunks(
            model, tokenizer, layout, requests, templates, z_layer, settings, selected, show_progress=show_progress
        )


def suffix_lengths(tokenizer: PreTrainedTokenizerBase, requests: list[EditRequest]) -> list[int]:
    """Per request, the number of tokens of a rewriting prompt from the subject's last token on (the rest of the
    prompt and the target but its last token): what the blocks after the z layer run for each of its prompts."""
    rows = _rows(tokenizer, requests, ["{}"])
    return [len(seq) - start for seq, start, kl in zip(rows.sequences, rows.lookup, rows.is_kl) if not kl]


def plan_chunks(tokenizer: PreTrainedTokenizerBase, requests: list[EditRequest], batch_size: int) -> list[list[int]]:
    """The chunks the z optimisation runs: the requests ordered by the number of tokens from their subject's last
    token to the end of prompt and target (ties by position), cut into the fewest chunks of at most `batch_size`
    (`ceil(n / batch_size)`), whose sizes differ by at most one (the larger ones first): 50 requests in chunks of
    16 run as 13 + 13 + 12 + 12, not 16 + 16 + 16 + 2 (a chunk's fixed cost, its build and every step's forwards,
    is paid whatever its size). The blocks after the z layer run only those tokens, padded within row buckets
    ([`plan_chunk_buckets`]): chunks of similar lengths pad almost nothing. A request's z does not depend on its
    chunk (every loss term is per request), so the plan changes no result beyond float rounding.

    Returns:
        `list[list[int]]`: per chunk, the indices of its requests.
    """
    lengths = suffix_lengths(tokenizer, requests)
    order = sorted(range(len(requests)), key=lambda i: (lengths[i], i))
    return balanced_chunks(order, batch_size)


def balanced_chunks(items: list, size: int) -> list[list]:
    """`items` cut in order into the fewest pieces of at most `size` (`ceil(len(items) / size)`), whose sizes differ
    by at most one, the larger ones first.

    Args:
        items (`list`): the items, in order.
        size (`int`): the largest piece (> 0).

    Returns:
        `list[list]`: the pieces (none for no items).
    """
    count = -(-len(items) // size)
    if count == 0:
        return []
    base, larger = divmod(len(items), count)
    pieces, start = [], 0
    for k in range(count):
        end = start + base + (k < larger)
        pieces.append(items[start:end])
        start = end
    return pieces


def _optimise_chunks(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    layout: ModelLayout,
    requests: list[EditRequest],
    templates: list[list[str]],
    z_layer: int,
    settings: ValueOptimisation,
    selected: list[list[int]],
    *,
    show_progress: bool,
) -> ValueResult:
    """The z optimisation of the chunks `selected` (lists of indices into `requests`), one after another; the result
    holds their requests in the order of `selected`."""
    flat = [t for group in templates for t in group]
    autocast_dtype = getattr(torch, settings.autocast_dtype) if settings.autocast_dtype else None
    runner = BlockRunner(model, layout, z_layer, autocast_dtype)
    # The templates' shared prefix tokens run once for every chunk (the model does not change during the optimisation).
    prefixes = TemplatePrefixes.build(runner, tokenizer, flat) if settings.use_prefix_cache and selected else None
    parts = []
    progress = progress_bar(show_progress, total=sum(map(len, selected)), desc="z optimisation")
    for members in selected:
        chunk_requests = [requests[i] for i in members]
        parts.append(_optimise_members(runner, tokenizer, chunk_requests, flat, settings, prefixes))
        progress.update(len(members))
    progress.close()
    if not parts:
        empty = torch.zeros(0)
        return ValueResult(
            empty.reshape(0, 0), empty.reshape(0, 0), empty, empty, empty, empty.long(), empty, z_layer=z_layer
        )
    return ValueResult(
        **_concatenated(parts),
        chunks=[members for p, members in zip(parts, selected) for members in _split_members(members, p)],
        z_layer=z_layer,
    )


def _concatenated(parts: list[ValueResult]) -> dict:
    """The per-request tensors and the schedules of `parts`, one after another."""
    tensors = {name: torch.cat([getattr(p, name) for p in parts]) for name in PER_REQUEST_FIELDS}
    timings = {name: [t for p in parts for t in getattr(p, name)] for name in ("chunk_seconds", "chunk_build_seconds")}
    return {**tensors, "schedule": [schedule for p in parts for schedule in p.schedule], **timings}


def _in_request_order(result: ValueResult, plan: list[list[int]]) -> ValueResult:
    """`result` of every chunk of `plan` (rows in plan order) with its per-request rows in request order."""
    if not plan:
        return result
    position = torch.empty(sum(map(len, plan)), dtype=torch.long)
    position[torch.tensor([i for members in plan for i in members])] = torch.arange(len(position))
    for name in PER_REQUEST_FIELDS:
        setattr(result, name, getattr(result, name)[position])
    return result


def _split_members(members: list[int], part: ValueResult) -> list[list[int]]:
    """`members` cut like the sub-chunks `part` was computed in (one piece unless memory ran out)."""
    pieces, start = [], 0
    for schedule in part.schedule:
        pieces.append(members[start : start + len(schedule[0])])
        start += len(schedule[0])
    return pieces


def _optimise_members(
    runner: BlockRunner,
    tokenizer: PreTrainedTokenizerBase,
    requests: list[EditRequest],
    templates: list[str],
    settings: ValueOptimisation,
    prefixes: TemplatePrefixes | None = None,
) -> ValueResult:
    """Optimise one chunk (with the flat context `templates` and their shared `prefixes`); when the accelerator runs
    out of memory, the chunk is
    split in halves (down to single requests) and each half is optimised on its own, which gives the same z
    (requests are independent)."""
    try:
        tick = time.perf_counter()
        chunk = ZChunk.build(
            runner,
            tokenizer,
            requests,
            templates,
            use_cache=settings.use_prefix_cache,
            first_token_weight=settings.first_token_weight,
            prefixes=prefixes,
        )
        built = time.perf_counter() - tick
        result = _optimise_chunk(chunk, settings)
        return replace(result, chunk_seconds=[time.perf_counter() - tick], chunk_build_seconds=[built])
    except torch.cuda.OutOfMemoryError:
        if len(requests) == 1:
            raise
    chunk = None
    if runner.model.device.type == "cuda":
        torch.cuda.empty_cache()
    half = len(requests) // 2
    logger.warning("Out of memory in the z optimisation of %d requests: splitting the chunk.", len(requests))
    parts = [
        _optimise_members(runner, tokenizer, requests[:half], templates, settings, prefixes),
        _optimise_members(runner, tokenizer, requests[half:], templates, settings, prefixes),
    ]
    return ValueResult(**_concatenated(parts))


def with_checked_prefix_cache(
    runner: BlockRunner,
    tokenizer: PreTrainedTokenizerBase,
    requests: list[EditRequest],
    templates: list[list[str]],
    settings: ValueOptimisation,
) -> ValueOptimisation:
    """`settings` with `use_prefix_cache` switched off when [`prefix_cache_supported`] says the shortcut is not exact
    for the runner's model (unchanged when it is off already or there are no requests)."""
    if not settings.use_prefix_cache or not requests:
        return settings
    return replace(settings, use_prefix_cache=prefix_cache_supported(runner, tokenizer, requests, templates))


def prefix_cache_supported(
    runner: BlockRunner, tokenizer: PreTrainedTokenizerBase, requests: list[EditRequest], templates: list[list[str]]
) -> bool:
    """Whether the z optimisation's KV-cache shortcut reproduces the plain forward for the runner's model
    ([`prefix_cache_matches`] on a chunk of the first two of `requests` with the context `templates`; pass a runner
    without autocast: this is about the architecture's cache handling, not rounding). The answer depends on the
    architecture, its dtype and device, not on the requests or the weights, so an editor asks once.

    Args:
        runner ([`BlockRunner`]): the model runner at the z layer.
        tokenizer (`PreTrainedTokenizerBase`): the tokenizer.
        requests (`list[EditRequest]`): requests to check with (the first two are used).
        templates (`list[list[str]]`): the context templates.

    Returns:
        `bool`: `True` when the shortcut is exact to the dtype's rounding (else a warning says why not).
    """
    flat = [t for group in templates for t in group]
    with frozen_parameters(runner.model):
        return prefix_cache_matches(ZChunk.build(runner, tokenizer, requests[:2], flat, use_cache=True))


@torch.no_grad()
def prefix_cache_matches(cached: "ZChunk") -> bool:
    """Whether the prefix-cache forward of `cached` (a chunk built with `use_cache=True`) reproduces the plain forward
    for this architecture (checked once per optimisation, on its first chunk); a warning says so when it does not.

    The two forwards sum the same terms in a different order, so they agree to the rounding of the model's dtype, not
    exactly: each output row's relative error must stay within [`prefix_cache_tolerance`] of that dtype (SmolLM2
    measures 1.4e-6 in float32 and 2.1e-2 in bfloat16, about 3 bfloat16 epsilons, where a bfloat16 plain forward
    differs from the float32 one by 3.1e-2). A cache that mishandles positions or masks is off by tens of percent.
    """
    runner = cached.runner
    error = prefix_cache_error(cached)
    tolerance = prefix_cache_tolerance(cached.hidden_full.dtype)
    if not error <= tolerance:  # NaN (e.g. float64 left padding in some architectures) fails too
        logger.warning(
            "The KV-cache shortcut of the z optimisation does not reproduce the plain forward for `%s` (largest "
            "relative error of an output row %.2e, tolerance %.1e for %s); using the plain forward.",
            type(runner.model).__name__,
            error,
            tolerance,
            cached.hidden_full.dtype,
        )
        return False
    return True


@torch.no_grad()
def prefix_cache_error(cached: "ZChunk") -> float:
    """The largest relative error of an output row of the prefix-cache forward of `cached` (a chunk built with
    `use_cache=True`) against the plain forward of the same rows, with a zero delta.

    Args:
        cached ([`ZChunk`]): the chunk.

    Returns:
        `float`: `max_row ||cached - plain|| / ||plain||` over the label and KL outputs (NaN when either is NaN).
    """
    plain = ZChunk(cached.runner, cached.rows, cached.hidden_full, cached.pad, use_cache=False)
    zeros = torch.zeros(cached.num_requests, cached.hidden_full.shape[2], device=cached.hidden_full.device)
    expected = plain.forward(zeros.float())
    actual = cached.forward(zeros.float())
    return max(
        float(((a.float() - e.float()).norm(dim=-1) / e.float().norm(dim=-1).clamp_min(1e-12)).max())
        for a, e in zip(actual, expected)
    )


def prefix_cache_tolerance(dtype: torch.dtype) -> float:
    """Largest relative error of an output row that [`prefix_cache_matches`] accepts for a model computing in `dtype`:
    `1e-3`, or 8 machine epsilons of a half-precision dtype (6.25e-2 for bfloat16, 7.8e-3 for float16).

    Args:
        dtype (`torch.dtype`): the dtype of the model's hidden states.

    Returns:
        `float`: the tolerance.
    """
    return max(1e-3, 8 * torch.finfo(dtype).eps) if dtype.is_floating_point else 1e-3


@dataclass
class StopRule:
    """When a request's z optimisation has what it needs.

    A request stops at once when its loss falls below `loss` (the reference's rule), or `patience` iterations after
    the first one at which every target token was the most likely token of every one of its prompts by at least
    `margin` nats (ENCORE-style; `margin=None` disables it).

    Args:
        loss (`float`): the loss threshold.
        margin (`float`, *optional*): the log-probability lead over the runner-up token that starts the countdown.
        patience (`int`, *optional*, defaults to 5): iterations (steps) taken after the lead is first reached.
    """

    loss: float
    margin: float | None = ValueOptimisation.early_stop_margin
    patience: int = ValueOptimisation.early_stop_patience

    @classmethod
    def of(cls, settings: ValueOptimisation) -> "StopRule":
        """The stop rule of `settings` (`early_stop_loss`, `early_stop_margin`, `early_stop_patience`)."""
        return cls(settings.early_stop_loss, settings.early_stop_margin, settings.early_stop_patience)

    def done(self, loss: torch.Tensor, margin: torch.Tensor, leading_since: torch.Tensor, it: int) -> torch.Tensor:
        """Which requests stop at iteration `it`, given their `(a,)` losses and margins; `leading_since` (`(a,)`,
        -1 when not yet) records, in place, the first iteration at which each request reached the margin."""
        done = loss < self.loss
        if self.margin is not None:
            leading_since[(leading_since < 0) & (margin >= self.margin)] = it
            done |= (leading_since >= 0) & (it - leading_since >= self.patience)
        return done


def target_margins(logp: torch.Tensor, target_ids: torch.Tensor, owner: torch.Tensor, n: int) -> torch.Tensor:
    """Per request, the smallest margin `log p(target) - max_{v != target} log p(v)` over its label positions.

    Args:
        logp (`torch.Tensor`): `(labels, vocab)` log-probabilities at the label positions.
        target_ids (`torch.Tensor`): `(labels,)` the target token of each position.
        owner (`torch.Tensor`): `(labels,)` the request (0..n-1) of each position.
        n (`int`): number of requests.

    Returns:
        `torch.Tensor`: `(n,)` float32 margins (positive: greedy decoding follows the target everywhere).
    """
    target = logp.gather(1, target_ids[:, None]).squeeze(1)
    top2 = logp.topk(2, dim=1)
    # The best other token is the runner-up when the target leads, else the leader.
    others = torch.where(top2.indices[:, 0] == target_ids, top2.values[:, 1], top2.values[:, 0])
    margin = (target - others).float()
    full = torch.full((n,), float("inf"), device=logp.device)
    return full.scatter_reduce(0, owner, margin, reduce="amin")


def _optimise_chunk(state: ZChunk, settings: ValueOptimisation) -> ValueResult:
    num_steps, lr, weight_decay = settings.num_steps, settings.lr, settings.weight_decay
    clamp_norm_factor, kl_factor = settings.clamp_norm_factor, settings.kl_factor
    stop = StopRule.of(settings)
    runner = state.runner
    device = state.hidden_full.device
    rows = state.rows
    n = max(rows.row_request) + 1
    bare_rows = torch.arange(n, device=device) * rows.n_prompts
    lookup = torch.tensor(rows.lookup, device=device)
    h_init = state.hidden_full[bare_rows, lookup[bare_rows]].float()  # (n, d_model)
    h_norm = h_init.norm(dim=1)  # (n,)
    delta = torch.zeros_like(h_init)
    exp_avg, exp_avg_sq = torch.zeros_like(delta), torch.zeros_like(delta)
    kl_reference = None
    initial_loss, final_loss, final_nll, final_margin = torch.zeros(n), torch.zeros(n), torch.zeros(n), torch.zeros(n)
    steps = torch.zeros(n, dtype=torch.long)
    leading_since = torch.full((n,), -1, dtype=torch.long)  # first iteration with the target margin, per request
    schedule = []
    active = torch.arange(n)
    for it in range(num_steps):
        schedule.append(active.tolist())
        active_dev = active.to(device)
        delta_active = delta[active_dev].clone().requires_grad_(True)  # (a, d_model)
        b = state.batch
        with torch.enable_grad():
            label_hidden, kl_hidden = state.forward(delta_active)
            # Target NLL, logits only at the label positions: (labels, vocab).
            label_logp = torch.log_softmax(runner.logits(label_hidden), -1)
            token_nll = -label_logp.gather(1, b.label_ids[:, None]).squeeze(1)
            owner = b.row_request[b.label_rows]
            nll = torch.zeros(len(active), device=device).index_add(0, owner, token_nll * b.label_weight)  # (a,)
            # KL of the next-token distribution right after the subject in "{subject} is a".
            kl_logp = torch.log_softmax(runner.logits(kl_hidden), -1)  # (a, vocab)
            if kl_reference is None:
                kl_reference = kl_logp.detach()
            kl = (kl_logp.exp() * (kl_logp - kl_reference[active_dev])).sum(-1)  # (a,)
            decay = delta_active.norm(dim=1) / h_norm[active_dev] ** 2
            loss = nll + kl_factor * kl + weight_decay * decay  # (a,)
        loss_cpu = loss.detach().float().cpu()
        margin_cpu = target_margins(label_logp.detach(), b.label_ids, owner, len(active)).cpu()
        if it == 0:
            initial_loss[active] = loss_cpu
        final_loss[active] = loss_cpu
        final_nll[active] = nll.detach().float().cpu()
        final_margin[active] = margin_cpu
        lead = leading_since[active]
        done = stop.done(loss_cpu, margin_cpu, lead, it)
        leading_since[active] = lead
        if it == num_steps - 1 or done.all():
            break
        continuing = ~done
        (grad,) = torch.autograd.grad((loss * continuing.to(device)).sum(), delta_active)
        moving = active[continuing].to(device)
        d, m, v = delta[moving], exp_avg[moving], exp_avg_sq[moving]
        _adam_update(d, grad[continuing.to(device)], m, v, it + 1, lr)
        # Project each delta back into its ball ||d|| <= clamp * ||h||.
        scale = (clamp_norm_factor * h_norm[moving] / d.norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
        delta[moving], exp_avg[moving], exp_avg_sq[moving] = d * scale[:, None], m, v
        steps[active[continuing]] += 1
        if done.any():
            local = continuing.nonzero().squeeze(1).tolist()
            active = active[continuing]
            state = state.select(local)
    return ValueResult(
        targets=(h_init + delta).detach().float().cpu(),
        initial=h_init.detach().float().cpu(),
        initial_loss=initial_loss,
        final_loss=final_loss,
        final_nll=final_nll,
        steps=steps,
        final_margin=final_margin,
        schedule=[schedule],
    )
