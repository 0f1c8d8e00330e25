"""CounterFact probability tests (algorithm.md section 8.1), computed as the MEMIT harness computes them.

Every prompt is scored with two candidate continuations, `" " + target_new` and `" " + target_true`, by the mean
per-token negative log-likelihood of the continuation, teacher-forced ([`target_nlls`]). The per-prompt numbers are
then turned into the efficacy / paraphrase / neighborhood success rates, magnitudes and accuracies, averaged within
each case, then across cases, times 100 ([`counterfact_scores`]). [`evaluate_counterfact`] does both for a list of
[`EditRequest`]s.

[`evaluate_model`] runs these and the other metric families (zsRE token accuracy in `zsre_metrics`, generation
entropy and reference score in `generation_metrics`, corpus perplexity in `perplexity`) and merges their results;
[`Editor.evaluate`] calls it on the edited and on the unedited weights.
"""

import math
from collections.abc import Hashable, Iterator, Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .requests import EditRequest
from .tokenization import encode_targets, encode_texts, pad_batch, pad_token_id


REWRITE = "rewrite"
PARAPHRASE = "paraphrase"
NEIGHBORHOOD = "neighborhood"
PROMPT_KINDS = (REWRITE, PARAPHRASE, NEIGHBORHOOD)
"""The kinds of prompt a CounterFact case holds, as used in the `groups` of [`counterfact_scores`]."""

METRIC_KEYS = (
    "efficacy_success",
    "paraphrase_success",
    "neighborhood_success",
    "efficacy_magnitude",
    "paraphrase_magnitude",
    "neighborhood_magnitude",
    "efficacy_accuracy",
    "paraphrase_accuracy",
    "neighborhood_accuracy",
    "score",
)
"""The keys of the dictionary returned by [`counterfact_scores`] and [`evaluate_counterfact`]."""

_METRIC_PREFIX = {REWRITE: "efficacy", PARAPHRASE: "paraphrase", NEIGHBORHOOD: "neighborhood"}


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


def counterfact_scores(
    nll_new: torch.Tensor | Sequence[float],
    nll_true: torch.Tensor | Sequence[float],
    new_correct: torch.Tensor | Sequence[bool],
    true_correct: torch.Tensor | Sequence[bool],
    groups: Sequence[tuple[Hashable, str]],
) -> dict[str, float]:
    """The CounterFact probability metrics (algorithm.md section 8.1) from per-prompt numbers.

    For each prompt kind, a per-prompt value is averaged within each case, then across the cases that have at least
    one prompt of that kind, and multiplied by 100:

    - `efficacy_success` (ES) / `paraphrase_success` (PS): fraction of rewrite / paraphrase prompts with
      `nll_new < nll_true`; `neighborhood_success` (NS): fraction of neighborhood prompts with `nll_true < nll_new`.
    - `efficacy_magnitude` (EM) / `paraphrase_magnitude` (PM): mean of `exp(-nll_new) - exp(-nll_true)`;
      `neighborhood_magnitude` (NM): mean of `exp(-nll_true) - exp(-nll_new)`.
    - `*_accuracy`: fraction of prompts whose expected target has every token as the argmax: `new_correct` for the
      rewrite and paraphrase prompts, `true_correct` for the neighborhood prompts. Not used for the score.
    - `score`: harmonic mean of ES, PS and NS (0 when one of them is 0).

    When no case has a prompt of some kind, that kind's three metrics are NaN, and so is `score` when the missing
    kind is one of its components.

    Args:
        nll_new (`torch.Tensor` or `Sequence[float]` of shape `(num_prompts,)`):
            Mean per-token NLL of `target_new` after each prompt.
        nll_true (`torch.Tensor` or `Sequence[float]` of shape `(num_prompts,)`):
            Mean per-token NLL of the true target after each prompt (for neighborhood prompts, their own answer).
        new_correct (`torch.Tensor` or `Sequence[bool]` of shape `(num_prompts,)`):
            Whether every token of `target_new` is the argmax.
        true_correct (`torch.Tensor` or `Sequence[bool]` of shape `(num_prompts,)`):
            Whether every token of the true target is the argmax.
        groups (`Sequence[tuple[Hashable, str]]` of length `num_prompts`):
            For each prompt, `(case, kind)`: the case it belongs to (any hashable identifying the edit, e.g. its
            position in the request list) and its kind, one of `"rewrite"`, `"paraphrase"`, `"neighborhood"`
            (`PROMPT_KINDS`).

    Returns:
        `dict[str, float]`: the metrics under the keys of `METRIC_KEYS`, as percentages (magnitudes lie in
        [-100, 100], the others in [0, 100]).

    Raises:
        ValueError: when the inputs differ in length or a kind is not one of `PROMPT_KINDS`.
    """
    nll_new = torch.as_tensor(nll_new, dtype=torch.float64).flatten().cpu()
    nll_true = torch.as_tensor(nll_true, dtype=torch.float64).flatten().cpu()
    new_correct = torch.as_tensor(new_correct, dtype=torch.bool).flatten().cpu()
    true_correct = torch.as_tensor(true_correct, dtype=torch.bool).flatten().cpu()
    lengths = {len(nll_new), len(nll_true), len(new_correct), len(true_correct), len(groups)}
    if len(lengths) != 1:
        raise ValueError(
            "`nll_new`, `nll_true`, `new_correct`, `true_correct` and `groups` must have the same length (got "
            f"{len(nll_new)}, {len(nll_true)}, {len(new_correct)}, {len(true_correct)} and {len(groups)})."
        )
    for position, group in enumerate(groups):
        if len(group) != 2 or group[1] not in PROMPT_KINDS:
            raise ValueError(
                f"`groups[{position}]` must be a `(case, kind)` pair with kind in {PROMPT_KINDS} (got {group!r})."
            )

    prob_diff = torch.exp(-nll_new) - torch.exp(-nll_true)
    per_prompt = {
        REWRITE: ((nll_new < nll_true).double(), prob_diff, new_correct.double()),
        PARAPHRASE: ((nll_new < nll_true).double(), prob_diff, new_correct.double()),
        NEIGHBORHOOD: ((nll_true < nll_new).double(), -prob_diff, true_correct.double()),
    }
    results: dict[str, float] = {}
    for kind in PROMPT_KINDS:
        prefix = _METRIC_PREFIX[kind]
        selected = [i for i, (_, k) in enumerate(groups) if k == kind]
        cases = [groups[i][0] for i in selected]
        index = torch.tensor(selected, dtype=torch.long)
        for name, values in zip(("success", "magnitude", "accuracy"), per_prompt[kind]):
            results[f"{prefix}_{name}"] = per_case_mean(values[index], cases) * 100.0
    results["score"] = harmonic_mean(
        [results["efficacy_success"], results["paraphrase_success"], results["neighborhood_success"]]
    )
    return {key: results[key] for key in METRIC_KEYS}


def per_case_mean(values: torch.Tensor | Sequence[float], cases: Sequence[Hashable]) -> float:
    """Mean over cases of the mean of each case's values, as the reference harness aggregates every metric.

    Args:
        values (`torch.Tensor` or `Sequence[float]` of shape `(num_items,)`):
            One number per item (a prompt, or a target token).
        cases (`Sequence[Hashable]` of length `num_items`):
            The case each item belongs to.

    Returns:
        `float`: the mean of the per-case means (cases weigh equally whatever their number of items), NaN when
        there is no item.

    Raises:
        ValueError: when `values` and `cases` differ in length.
    """
    values = torch.as_tensor(values, dtype=torch.float64).flatten().cpu()
    if len(values) != len(cases):
        raise ValueError(f"`values` and `cases` must have the same length (got {len(values)} and {len(cases)}).")
    if not len(cases):
        return math.nan
    positions: dict[Hashable, int] = {}
    case_index = torch.tensor([positions.setdefault(case, len(positions)) for case in cases])
    sums = torch.zeros(len(positions), dtype=torch.float64).index_add_(0, case_index, values)
    counts = torch.bincount(case_index, minlength=len(positions)).double()
    return float((sums / counts).mean())


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean of non-negative numbers, as `scipy.stats.hmean` gives it for the reference's Score.

    Args:
        values (`Sequence[float]`): the numbers, e.g. ES, PS and NS in percent.

    Returns:
        `float`: NaN if a value is NaN (or there is none), 0 if a value is 0, else `len(values) / sum(1 / v)`.
    """
    values = [float(value) for value in values]
    if not values or any(math.isnan(value) for value in values):
        return math.nan
    if any(value == 0.0 for value in values):
        return 0.0
    return len(values) / sum(1.0 / value for value in values)


def evaluate_counterfact(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: list[EditRequest],
    batch_size: int = 64,
) -> dict[str, float]:
    """Run the CounterFact probability tests (algorithm.md section 8.1) for `requests` on `model`.

    Each request contributes its rewrite prompt (`request.text`), its paraphrase prompts and its neighborhood prompts.
    Every prompt is scored with `target_new` and with its true target (`target_true`; for neighborhood prompts
    `neighborhood_target`, falling back to `target_true`) in one batched [`target_nlls`] call, and the results are
    aggregated per case by [`counterfact_scores`].

    Args:
        model (`PreTrainedModel`):
            The (edited) causal language model.
        tokenizer (`PreTrainedTokenizerBase`):
            The model's tokenizer.
        requests (`list[EditRequest]`):
            The edit requests, e.g. from [`load_requests`]; each needs a `target_true`.
        batch_size (`int`, *optional*, defaults to 64):
            Number of (prompt, target) pairs per forward pass.

    Returns:
        `dict[str, float]`: the metrics under the keys of `METRIC_KEYS` (see [`counterfact_scores`]), as percentages.
        Paraphrase (neighborhood) metrics average over the requests that have paraphrase (neighborhood) prompts;
        they, and `score`, are NaN when no request has any.

    Raises:
        ValueError: when a request has no `target_true` (the message names its `record_index`) or `requests` is
            empty.
    """
    if not requests:
        raise ValueError("`evaluate_counterfact` needs at least one request.")
    prompts: list[str] = []
    true_targets: list[str] = []
    new_targets: list[str] = []
    groups: list[tuple[int, str]] = []
    for case, request in enumerate(requests):
        if request.target_true is None or not request.target_true.strip():
            raise ValueError(
                f"Request {request.record_index}: field `target_true` is missing; the CounterFact evaluation compares "
                "`target_new` against the true target, so every request needs one."
            )
        neighborhood_target = request.neighborhood_target or request.target_true
        entries = [(request.text, request.target_true, REWRITE)]
        entries += [(prompt, request.target_true, PARAPHRASE) for prompt in request.paraphrase_prompts]
        entries += [(prompt, neighborhood_target, NEIGHBORHOOD) for prompt in request.neighborhood_prompts]
        for prompt, true_target, kind in entries:
            prompts.append(prompt)
            true_targets.append(true_target)
            new_targets.append(request.target_new)
            groups.append((case, kind))

    num_prompts = len(prompts)
    nlls, correct = target_nlls(model, tokenizer, prompts + prompts, new_targets + true_targets, batch_size)
    return counterfact_scores(
        nlls[:num_prompts], nlls[num_prompts:], correct[:num_prompts], correct[num_prompts:], groups
    )


EVALUATION_METRICS = ("counterfact", "zsre", "generation", "perplexity")
"""The metric families [`evaluate_model`] runs: CounterFact probabilities ([`evaluate_counterfact`]), zsRE token
accuracy ([`~memit_hf.zsre_metrics.evaluate_zsre`]), CounterFact generation entropy and reference score
([`~memit_hf.generation_metrics.evaluate_generation`]) and corpus perplexity ([`~memit_hf.perplexity.perplexity`])."""


def evaluate_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: list[EditRequest],
    metrics: Sequence[str] = ("counterfact",),
    batch_size: int = 64,
    perplexity_texts: Any = None,
    perplexity_num_tokens: int | None = None,
    reference_texts: Sequence[Sequence[str]] | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Run the chosen metric families on `model` and merge their results into one flat dictionary (percentages,
    except `generation_entropy` and `perplexity`).

    Args:
        model (`PreTrainedModel`):
            The causal language model, as it is now (edited or not).
        tokenizer (`PreTrainedTokenizerBase`):
            The model's tokenizer.
        requests (`list[EditRequest]`):
            The requests whose prompts are scored.
        metrics (`Sequence[str]`, *optional*, defaults to `("counterfact",)`):
            Families from `EVALUATION_METRICS` (or one name). `"perplexity"` is added when `perplexity_texts` is
            given.
        batch_size (`int`, *optional*, defaults to 64):
            Sequences per forward pass (prompts per `generate` call for `"generation"`).
        perplexity_texts (`list[str]`, `datasets.Dataset` or text file paths, *optional*):
            Held-out corpus for `"perplexity"`.
        perplexity_num_tokens (`int`, *optional*):
            Token budget of the perplexity (default: the whole corpus).
        reference_texts (`Sequence[Sequence[str]]`, *optional*):
            Per-request reference texts of the reference score (see
            [`~memit_hf.generation_metrics.evaluate_generation`]).
        seed (`int`, *optional*, defaults to 0):
            Seed of the sampled generations and of the perplexity's text order.

    Returns:
        `dict[str, float]`: the union of the families' keys: `METRIC_KEYS`, `ZSRE_METRIC_KEYS`, `generation_entropy`
        (and `reference_score`), `perplexity`.

    Raises:
        ValueError: for an unknown family, or `"perplexity"` without `perplexity_texts`.
    """
    chosen = list(dict.fromkeys([metrics] if isinstance(metrics, str) else metrics))
    if perplexity_texts is not None and "perplexity" not in chosen:
        chosen.append("perplexity")
    unknown = [name for name in chosen if name not in EVALUATION_METRICS]
    if unknown:
        raise ValueError(f"Unknown metrics {unknown}; choose from {EVALUATION_METRICS}.")
    if "perplexity" in chosen and perplexity_texts is None:
        raise ValueError("`metrics` has `perplexity` but no `perplexity_texts` was given.")
    results: dict[str, float] = {}
    if "counterfact" in chosen:
        results.update(evaluate_counterfact(model, tokenizer, requests, batch_size=batch_size))
    if "zsre" in chosen:
        from .zsre_metrics import evaluate_zsre

        results.update(evaluate_zsre(model, tokenizer, requests, batch_size=batch_size))
    if "generation" in chosen:
        from .generation_metrics import evaluate_generation

        results.update(
            evaluate_generation(
                model, tokenizer, requests, reference_texts=reference_texts, seed=seed, batch_size=batch_size
            )
        )
    if "perplexity" in chosen:
        from .perplexity import perplexity

        results["perplexity"] = perplexity(
            model, tokenizer, perplexity_texts, num_tokens=perplexity_num_tokens, seed=seed
        )
    return results
