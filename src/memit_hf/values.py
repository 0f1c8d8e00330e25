"""Target values z: the residual stream after block L that makes each request's target most likely.

All requests of a chunk are optimised together as one `(n, d_model)` delta with per-request clamp, KL reference,
weight-decay denominator and early stop, which reproduces the reference's one-request-at-a-time loop exactly
(algorithm.md sections 4 and 11). Blocks `0..L` run once; each step runs only blocks `L+1..` and the LM head at the
label and KL positions.
"""

import math
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .architectures import ModelLayout
from .keys import contextualise
from .requests import EditRequest
from .tokenization import encode_targets, pad_batch, pad_token_id
from .tracing import capture, run_until_stopped, skip_blocks


KL_TEMPLATE = "{} is a"


@dataclass
class ValueResult:
    """Output of [`compute_target_values`].

    Args:
        targets (`torch.Tensor`): `(n, d_model)` float32 target vectors z = h + delta.
        initial (`torch.Tensor`): `(n, d_model)` float32 block-L output h at the subject-last token (bare prompt).
        initial_loss, final_loss (`torch.Tensor`): `(n,)` loss of each request before and after optimisation.
        final_nll (`torch.Tensor`): `(n,)` target NLL part of the final loss.
        steps (`torch.Tensor`): `(n,)` optimisation steps taken per request.
    """

    targets: torch.Tensor
    initial: torch.Tensor
    initial_loss: torch.Tensor
    final_loss: torch.Tensor
    final_nll: torch.Tensor
    steps: torch.Tensor
    step_batches: list = field(default_factory=list, repr=False)


@dataclass
class _Chunk:
    """Token tensors of one chunk of requests: `n_prompts` rewriting prompts plus one KL prompt per request."""

    input_ids: torch.Tensor  # (rows, seq)
    attention_mask: torch.Tensor  # (rows, seq)
    lookup: torch.Tensor  # (rows,) subject-last index per row
    row_request: torch.Tensor  # (rows,) request index (within the chunk) of each row
    label_rows: torch.Tensor  # (P,) row of each label position
    label_cols: torch.Tensor  # (P,) column of each label position
    label_ids: torch.Tensor  # (P,) target token predicted there
    label_weight: torch.Tensor  # (P,) 1 / (len(target) * n_prompts): sums to the reference's NLL per request
    kl_rows: torch.Tensor  # (n,) row of each request's KL prompt
    n_prompts: int

    def select(self, requests: torch.Tensor) -> tuple["_Chunk", torch.Tensor]:
        """The sub-chunk holding only `requests` (sorted chunk-local indices, renumbered 0..len-1), and its rows."""
        keep_rows = torch.isin(self.row_request, requests)
        row_map = torch.full((len(keep_rows),), -1, dtype=torch.long)
        row_map[keep_rows] = torch.arange(int(keep_rows.sum()))
        req_map = torch.full((int(self.row_request.max()) + 1,), -1, dtype=torch.long)
        req_map[requests] = torch.arange(len(requests))
        keep_labels = keep_rows[self.label_rows]
        rows = keep_rows.nonzero().squeeze(1)
        width = int(self.attention_mask[rows].sum(1).max())
        sub = _Chunk(
            input_ids=self.input_ids[rows, :width],
            attention_mask=self.attention_mask[rows, :width],
            lookup=self.lookup[rows],
            row_request=req_map[self.row_request[rows]],
            label_rows=row_map[self.label_rows[keep_labels]],
            label_cols=self.label_cols[keep_labels],
            label_ids=self.label_ids[keep_labels],
            label_weight=self.label_weight[keep_labels],
            kl_rows=row_map[self.kl_rows[requests]],
            n_prompts=self.n_prompts,
        )
        return sub, rows


def _build_chunk(tokenizer: PreTrainedTokenizerBase, requests: list[EditRequest], templates: list[str]) -> _Chunk:
    n, n_prompts = len(requests), len(templates)
    target_ids = encode_targets(tokenizer, [r.target_new for r in requests])
    prompt_ids, prompt_idx = contextualise(tokenizer, requests, templates)
    kl_ids, kl_idx = contextualise(tokenizer, requests, [KL_TEMPLATE])
    sequences, lookup, row_request = [], [], []
    label_rows, label_cols, label_ids, label_weight = [], [], [], []
    for i in range(n):
        target = target_ids[i]
        for j in range(n_prompts):
            ids = prompt_ids[i * n_prompts + j]
            row = len(sequences)
            # Position p predicts token p + 1: the last prompt token predicts the first target token.
            label_rows += [row] * len(target)
            label_cols += range(len(ids) - 1, len(ids) - 1 + len(target))
            label_ids += target
            label_weight += [1.0 / (len(target) * n_prompts)] * len(target)
            sequences.append(ids + target[:-1])
            lookup.append(prompt_idx[i * n_prompts + j])
            row_request.append(i)
    kl_rows = list(range(len(sequences), len(sequences) + n))
    sequences += kl_ids
    lookup += kl_idx
    row_request += list(range(n))
    input_ids, attention_mask = pad_batch(sequences, pad_token_id(tokenizer))
    return _Chunk(
        input_ids=input_ids,
        attention_mask=attention_mask,
        lookup=torch.tensor(lookup),
        row_request=torch.tensor(row_request),
        label_rows=torch.tensor(label_rows),
        label_cols=torch.tensor(label_cols),
        label_ids=torch.tensor(label_ids),
        label_weight=torch.tensor(label_weight, dtype=torch.float32),
        kl_rows=torch.tensor(kl_rows),
        n_prompts=n_prompts,
    )


def _logits(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """LM-head logits (float32) for final hidden states, with the model's logit soft-capping if it has one."""
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


class _ForwardFromBlock:
    """Runs `model` from block `z_layer + 1` on, given the block-`z_layer` output of every row."""

    def __init__(self, model: PreTrainedModel, layout: ModelLayout, z_layer: int):
        self.model = model
        self.blocks = list(model.get_submodule(layout.layers_attr))[: z_layer + 1]
        self.layer_name = layout.layer_name(z_layer)
        self.template_output = None

    @torch.no_grad()
    def block_output(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Block-`z_layer` output `(rows, seq, d_model)`, running only blocks `0..z_layer`."""
        with capture(self.model, outputs=[self.layer_name], stop_after=self.layer_name) as store:
            block = self.model.get_submodule(self.layer_name)

            def keep_container(module, args, output):
                self.template_output = output

            handle = block.register_forward_hook(keep_container, prepend=True)
            try:
                run_until_stopped(
                    lambda: self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
                )
            finally:
                handle.remove()
        return store["out:" + self.layer_name]

    def final_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, hidden: torch.Tensor):
        """Final (normed) hidden states `(rows, seq, d_model)` when block `z_layer` outputs `hidden`."""
        with skip_blocks(self.blocks, lambda: hidden, self.template_output):
            return self.model.base_model(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).last_hidden_state


def _adam_update(delta, grad, exp_avg, exp_avg_sq, step: int, lr: float, betas=(0.9, 0.999), eps=1e-8):
    """One step of `torch.optim.Adam` (default settings) on the given rows, in place."""
    exp_avg.mul_(betas[0]).add_(grad, alpha=1 - betas[0])
    exp_avg_sq.mul_(betas[1]).addcmul_(grad, grad, value=1 - betas[1])
    bias_correction1 = 1 - betas[0] ** step
    bias_correction2 = 1 - betas[1] ** step
    denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
    delta.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


def compute_target_values(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    layout: ModelLayout,
    requests: list[EditRequest],
    templates: list[list[str]],
    z_layer: int,
    *,
    num_steps: int = 25,
    lr: float = 0.5,
    weight_decay: float = 0.5,
    clamp_norm_factor: float = 0.75,
    kl_factor: float = 0.0625,
    early_stop_loss: float = 0.05,
    batch_size: int = 64,
    record_batches: bool = False,
    show_progress: bool = True,
) -> ValueResult:
    """Optimise the target vector z of every request at block `z_layer` (algorithm.md section 4).

    The loss of request i is `mean_prompts(NLL(target)) + kl_factor * KL(p || p0) + weight_decay * ||d_i|| /
    ||h_i||^2`; each request takes Adam steps (lr `lr`) until its loss falls below `early_stop_loss` or `num_steps`
    iterations have run (the last takes no step), with `||d_i||` clamped to `clamp_norm_factor * ||h_i||`.

    Args:
        templates (`list[list[str]]`): context templates from [`~memit_hf.keys.generate_context_templates`].
        batch_size (`int`): requests per chunk; chunks are optimised one after another.
        record_batches (`bool`): keep the `(input_ids, attention_mask)` shapes of every step (for benchmarks).

    Returns:
        [`ValueResult`]
    """
    flat = [t for group in templates for t in group]
    runner = _ForwardFromBlock(model, layout, z_layer)
    parts = []
    progress = tqdm(total=len(requests), desc="z optimisation", disable=not show_progress)
    for start in range(0, len(requests), batch_size):
        chunk_requests = requests[start : start + batch_size]
        parts.append(
            _optimise_chunk(
                model, runner, _build_chunk(tokenizer, chunk_requests, flat), num_steps, lr, weight_decay,
                clamp_norm_factor, kl_factor, early_stop_loss, record_batches,
            )
        )  # fmt: skip
        progress.update(len(chunk_requests))
    progress.close()
    return ValueResult(
        targets=torch.cat([p.targets for p in parts]),
        initial=torch.cat([p.initial for p in parts]),
        initial_loss=torch.cat([p.initial_loss for p in parts]),
        final_loss=torch.cat([p.final_loss for p in parts]),
        final_nll=torch.cat([p.final_nll for p in parts]),
        steps=torch.cat([p.steps for p in parts]),
        step_batches=[b for p in parts for b in p.step_batches],
    )


def _optimise_chunk(
    model, runner, chunk, num_steps, lr, weight_decay, clamp_norm_factor, kl_factor, early_stop_loss, record_batches
) -> ValueResult:
    device = model.device
    n = len(chunk.kl_rows)
    hidden_all = runner.block_output(chunk.input_ids.to(device), chunk.attention_mask.to(device))
    bare_rows = torch.arange(n) * chunk.n_prompts
    h_init = hidden_all[bare_rows.to(device), chunk.lookup[bare_rows].to(device)].float()  # (n, d_model)
    h_norm = h_init.norm(dim=1)  # (n,)
    delta = torch.zeros_like(h_init)
    exp_avg, exp_avg_sq = torch.zeros_like(delta), torch.zeros_like(delta)
    kl_reference = torch.zeros(n, 0, device=device)
    initial_loss = torch.zeros(n)
    final_loss, final_nll = torch.zeros(n), torch.zeros(n)
    steps = torch.zeros(n, dtype=torch.long)
    step_batches = []

    active = torch.arange(n)
    sub = chunk
    sub_hidden = hidden_all
    for it in range(num_steps):
        ids, mask = sub.input_ids.to(device), sub.attention_mask.to(device)
        rows = torch.arange(len(sub.lookup), device=device)
        delta_active = delta[active.to(device)].clone().requires_grad_(True)  # (a, d_model)
        with torch.enable_grad():
            hidden = (
                sub_hidden.detach()
                .to(h_init.dtype)
                .index_put((rows, sub.lookup.to(device)), delta_active[sub.row_request.to(device)], accumulate=True)
            )
            final = runner.final_hidden(ids, mask, hidden.to(sub_hidden.dtype))
            # Target NLL: logits only at the label positions, (P, vocab).
            label_logp = torch.log_softmax(
                _logits(model, final[sub.label_rows.to(device), sub.label_cols.to(device)]), -1
            )
            token_nll = -label_logp.gather(1, sub.label_ids.to(device)[:, None]).squeeze(1)
            owner = sub.row_request[sub.label_rows].to(device)
            nll = torch.zeros(len(active), device=device).index_add(
                0, owner, token_nll * sub.label_weight.to(device)
            )  # (a,)
            # KL of the next-token distribution right after the subject in "{subject} is a".
            kl_logp = torch.log_softmax(
                _logits(model, final[sub.kl_rows.to(device), sub.lookup[sub.kl_rows].to(device)]), -1
            )
            if it == 0:
                kl_reference = kl_logp.detach()
            reference = kl_reference if it == 0 else kl_reference[active.to(device)]
            kl = (kl_logp.exp() * (kl_logp - reference)).sum(-1)  # (a,)
            decay = delta_active.norm(dim=1) / h_norm[active.to(device)] ** 2
            loss = nll + kl_factor * kl + weight_decay * decay  # (a,)
        if record_batches:
            step_batches.append((tuple(ids.shape), len(sub.label_ids), len(active)))
        loss_cpu = loss.detach().float().cpu()
        if it == 0:
            initial_loss[active] = loss_cpu
        final_loss[active] = loss_cpu
        final_nll[active] = nll.detach().float().cpu()
        done = loss_cpu < early_stop_loss
        if it == num_steps - 1:
            break
        continuing = ~done
        if not continuing.any():
            break
        (loss * continuing.to(device)).sum().backward()
        grad = delta_active.grad[continuing.to(device)]
        moving = active[continuing].to(device)
        d, m, v = delta[moving], exp_avg[moving], exp_avg_sq[moving]
        _adam_update(d, grad, m, v, it + 1, lr)
        # Project each delta back into its ball ||d|| <= clamp * ||h||.
        max_norm = clamp_norm_factor * h_norm[moving]
        scale = (max_norm / d.norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
        delta[moving], exp_avg[moving], exp_avg_sq[moving] = d * scale[:, None], m, v
        steps[active[continuing]] += 1
        if done.any():
            active = active[continuing]
            sub, kept_rows = chunk.select(active)
            sub_hidden = hidden_all[kept_rows.to(device), : sub.input_ids.shape[1]]
    return ValueResult(
        targets=(h_init + delta).detach().float().cpu(),
        initial=h_init.detach().float().cpu(),
        initial_loss=initial_loss,
        final_loss=final_loss,
        final_nll=final_nll,
        steps=steps,
        step_batches=step_batches,
    )
