"""Teacher-forced scoring of `(prompt, target)` pairs, the leaf that the CounterFact and zsRE metrics share.

Pair `i` is scored on `encode_texts(prompts[i]) + encode_targets(targets[i])` in batched forward passes, right-padded
by hand: [`target_nlls`] gives the mean per-token NLL of each target and whether every target token is the argmax,
[`target_token_hits`] the argmax hit of every target token. This module imports no other evaluation module.
"""

from collections.abc import Iterator

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..architectures import output_logits
from ..tokenization import encode_targets, encode_texts, pad_batch, pad_token_id


def _check_pairs(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], targets: list[str], batch_size: int
) -> tuple[list[list[int]], list[list[int]]]:
    """Encode `(prompt, target)` pairs as [`target_nlls`] scores them, raising for unusable pairs."""
    if len(prompts) != len(targets):
        raise ValueError(f"`prompts` and `targets` must have the same length (got {len(prompts)} and {len(targets)}).")
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer (got {batch_size}).")
    prompt_ids = encode_texts(tokenizer, list(prompts))
    target_ids = encode_targets(tokenizer, list(targets))
    for i, (p_ids, t_ids) in enumerate(zip(prompt_ids, target_ids)):
        if not p_ids:
            raise ValueError(
                f"Pair {i}: the prompt {prompts[i]!r} encodes to no token; nothing can predict the target."
            )
        if not t_ids:
            raise ValueError(f"Pair {i}: the target {targets[i]!r} encodes to no token.")
    return prompt_ids, target_ids


def _compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """float64 for a float64 model (so that its scores keep that precision), float32 otherwise."""
    parameter = next(model.parameters(), None)
    return torch.float64 if parameter is not None and parameter.dtype == torch.float64 else torch.float32


class LogitsAtPositions:
    """A causal LM's logits at chosen positions of each row, the LM head run only there.

    The decoder runs the whole batch (`model.base_model`) and the head ([`~memit_hf.architectures.output_logits`])
    only the gathered positions: a teacher-forced score needs one position per target token, and the head over every
    position of every row is about a fifth of a small model's multiply-adds (more with a large vocabulary; measured
    on SmolLM2 on a CPU it saves ~4 % of the time) and its largest tensor. The first call also runs the model itself and compares: a model whose logits are not its head's
    (a logit scale, a wrapper without `base_model`) is scored from its own full logits from then on.

    Args:
        model (`PreTrainedModel`): the causal language model.
    """

    def __init__(self, model: PreTrainedModel):
        self.model = model
        self.head_only: bool | None = None  # unknown until the first call compares

    def full(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The logits at `positions` taken from the model's own output (every position through the head)."""
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        return torch.gather(logits, 1, positions.to(logits.device)[..., None].expand(-1, -1, logits.shape[-1]))

    def head(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor):
        """The logits at `positions` from the decoder's hidden states and the head, or `None` when the model does
        not split that way."""
        decoder = getattr(self.model, "base_model", None)
        if decoder is None or decoder is self.model or self.model.get_output_embeddings() is None:
            return None
        try:
            hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        except (AttributeError, TypeError):
            return None
        index = positions.to(hidden.device)[..., None].expand(-1, -1, hidden.shape[-1])
        return output_logits(self.model, torch.gather(hidden, 1, index))

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits `(rows, positions, vocab)` at `positions` `(rows, k)` of the right-padded batch."""
        if self.head_only is False:
            return self.full(input_ids, attention_mask, positions)
        picked = self.head(input_ids, attention_mask, positions)
        if self.head_only is None:
            full = self.full(input_ids, attention_mask, positions)
            self.head_only = picked is not None and same_logits(picked, full)
            return picked if self.head_only else full
        return picked


def same_logits(candidate: torch.Tensor, reference: torch.Tensor) -> bool:
    """Whether `candidate` equals `reference` up to rounding: shapes equal and every entry within 16 units of the
    reference dtype's precision of the largest logit (float32: ~4e-5 on logits of ~20; a logit scale is far out)."""
    if candidate.shape != reference.shape:
        return False
    tolerance = 16 * torch.finfo(reference.dtype).eps * float(reference.abs().max().clamp_min(1.0))
    return bool(((candidate.double() - reference.double()).abs() <= tolerance).all())


def _teacher_forced(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[list[int]],
    target_ids: list[list[int]],
    batch_size: int,
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per batch of pairs: `(indices, token_nll, token_ok, valid)`, each tensor `(batch, max_target_len)` on the CPU.

    `token_nll` is the NLL of each target token (float32, or float64 for a float64 model), `token_ok` whether it is
    the argmax of its logits, `valid` masks the padded slots. One forward pass per batch, pairs sorted by length and
    right-padded by hand; the model is in eval mode during the call and its previous mode is restored.
    """
    device = model.device
    compute_dtype = _compute_dtype(model)
    pad_id = pad_token_id(tokenizer)
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]) + len(target_ids[i]), reverse=True)
    logits_at = LogitsAtPositions(model)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            sequences = [prompt_ids[i] + target_ids[i] for i in batch]
            input_ids, attention_mask = pad_batch(sequences, pad_id, device=device)

            prompt_lens = torch.tensor([len(prompt_ids[i]) for i in batch], device=device)
            target_lens = torch.tensor([len(target_ids[i]) for i in batch], device=device)
            offsets = torch.arange(int(target_lens.max()), device=device)
            valid = offsets[None, :] < target_lens[:, None]  # (batch, max_target_len)
            # Position of target token j in the sequence, and of the logits that predict it; padded slots point at
            # the last prompt token, a real position, and are masked out by `valid`.
            token_pos = torch.where(valid, prompt_lens[:, None] + offsets[None, :], prompt_lens[:, None] - 1)
            logit_pos = torch.where(valid, token_pos - 1, token_pos)

            picked = logits_at(input_ids, attention_mask, logit_pos).to(compute_dtype)
            wanted = torch.gather(input_ids, 1, token_pos)
            log_probs = torch.log_softmax(picked, dim=-1)
            token_nll = -torch.gather(log_probs, 2, wanted[..., None]).squeeze(-1)
            token_ok = picked.argmax(dim=-1) == wanted
            yield batch, (token_nll * valid).cpu(), (token_ok & valid).cpu(), valid.cpu()
    finally:
        model.train(was_training)


@torch.no_grad()
def target_nlls(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    targets: list[str],
    batch_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced mean per-token NLL of each target continuation, and whether every target token is the argmax.

    Pair `i` is scored on the sequence `encode_texts(prompts[i]) + encode_targets(targets[i])` (the prompt with the
    tokenizer's special tokens, e.g. a BOS, then the target with a leading space and no special tokens). Target token
    `j` is scored by the logits at position `len(prompt_ids) + j - 1`. Pairs are sorted by length and run in batches
    of `batch_size`, right-padded by hand (so the tokenizer's padding side does not matter), one forward pass per
    batch on `model.device`. The model is put in eval mode for the call and its previous mode is restored.

    Args:
        model (`PreTrainedModel`):
            A causal language model returning `logits`.
        tokenizer (`PreTrainedTokenizerBase`):
            The model's tokenizer.
        prompts (`list[str]`):
            The prefixes, one per pair.
        targets (`list[str]`):
            The continuations, one per pair, without a leading space (one is added).
        batch_size (`int`, *optional*, defaults to 64):
            Number of pairs per forward pass.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: on the CPU, in the order of the inputs, both of shape `(len(prompts),)`:
        - the mean per-token NLL of each target (natural log; `torch.float32`, or `torch.float64` for a float64
          model, whose log-softmax is then computed in float64 too);
        - a `torch.bool` tensor, `True` where every target token is the argmax of its logits.

    Raises:
        ValueError: when `prompts` and `targets` differ in length, `batch_size` is not positive, or a prompt or
            target encodes to no token.
    """
    prompt_ids, target_ids = _check_pairs(tokenizer, prompts, targets, batch_size)
    nlls = torch.empty(len(prompts), dtype=_compute_dtype(model))
    correct = torch.empty(len(prompts), dtype=torch.bool)
    for batch, token_nll, token_ok, valid in _teacher_forced(model, tokenizer, prompt_ids, target_ids, batch_size):
        index = torch.tensor(batch)
        nlls[index] = token_nll.sum(dim=1) / valid.sum(dim=1)
        correct[index] = (token_ok | ~valid).all(dim=1)
    return nlls, correct


@torch.no_grad()
def target_token_hits(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    targets: list[str],
    batch_size: int = 64,
) -> list[torch.Tensor]:
    """Teacher-forced top-1 hit of every target token: is token `j` the argmax after the prompt and tokens `< j`?

    The pairs are encoded, batched and scored exactly as in [`target_nlls`] (one forward pass per batch), so
    `target_token_hits(...)[i].all()` equals the second output of [`target_nlls`]. This is the zsRE token-level
    accuracy (algorithm.md section 8.3) computed in one pass per batch instead of one sequence per target token.

    Args:
        model (`PreTrainedModel`):
            A causal language model returning `logits`.
        tokenizer (`PreTrainedTokenizerBase`):
            The model's tokenizer.
        prompts (`list[str]`):
            The prefixes, one per pair.
        targets (`list[str]`):
            The continuations, one per pair, without a leading space (one is added).
        batch_size (`int`, *optional*, defaults to 64):
            Number of pairs per forward pass.

    Returns:
        `list[torch.Tensor]`: for each pair, in input order, a `torch.bool` tensor of shape `(num_target_tokens,)`.

    Raises:
        ValueError: as [`target_nlls`].
    """
    prompt_ids, target_ids = _check_pairs(tokenizer, prompts, targets, batch_size)
    hits: list[torch.Tensor] = [torch.zeros(0, dtype=torch.bool)] * len(prompts)
    for batch, _, token_ok, _ in _teacher_forced(model, tokenizer, prompt_ids, target_ids, batch_size):
        for row, i in enumerate(batch):
            hits[i] = token_ok[row, : len(target_ids[i])].clone()
    return hits
