"""Teacher-forced scoring of `(prompt, target)` pairs, the leaf that the CounterFact and zsRE metrics share.

Pair `i` is scored on `encode_texts(prompts[i]) + encode_targets(targets[i])` in batched forward passes, right-padded
by hand: [`target_nlls`] gives the mean per-token NLL of each target and whether every target token is the argmax,
[`target_token_hits`] the argmax hit of every target token. This module imports no other evaluation module.
"""

from collections.abc import Iterator

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

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
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            sequences = [prompt_ids[i] + target_ids[i] for i in batch]
            input_ids, attention_mask = pad_batch(sequences, pad_id, device=device)
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits

            prompt_lens = torch.tensor([len(prompt_ids[i]) for i in batch], device=device)
            target_lens = torch.tensor([len(target_ids[i]) for i in batch], device=device)
            offsets = torch.arange(int(target_lens.max()), device=device)
            valid = offsets[None, :] < target_lens[:, None]  # (batch, max_target_len)
            # Position of target token j in the sequence, and of the logits that predict it; padded slots point at
            # the last prompt token, a real position, and are masked out by `valid`.
            token_pos = torch.where(valid, prompt_lens[:, None] + offsets[None, :], prompt_lens[:, None] - 1)
            logit_pos = torch.where(valid, token_pos - 1, token_pos)

            picked = torch.gather(logits, 1, logit_pos[..., None].expand(-1, -1, logits.shape[-1]))
            picked = picked.to(compute_dtype)
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
