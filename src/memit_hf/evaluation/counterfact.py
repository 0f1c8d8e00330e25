"""CounterFact probability tests (algorithm.md section 8.1), computed as the MEMIT harness computes them.

Every prompt is scored with two candidate continuations, `" " + target_new` and `" " + target_true`, by the mean
per-token negative log-likelihood of the continuation, teacher-forced ([`~memit_hf.evaluation.scoring.target_nlls`]).
The per-prompt numbers are then turned into the efficacy / paraphrase / neighborhood success rates, magnitudes and
accuracies, averaged within each case, then across cases, times 100 ([`counterfact_scores`]).
[`evaluate_counterfact`] does both for a list of [`EditRequest`]s. The prompt kinds (`REWRITE`, `PARAPHRASE`,
`NEIGHBORHOOD`, `PROMPT_KINDS`) are defined in [`~memit_hf.evaluation.aggregation`] and re-exported here.
"""

from collections.abc import Hashable, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..requests import EditRequest
from .aggregation import NEIGHBORHOOD, PARAPHRASE, PROMPT_KINDS, REWRITE, check_groups, harmonic_mean, per_case_mean
from .scoring import target_nlls


__all__ = [
    "METRIC_KEYS",
    "NEIGHBORHOOD",
    "PARAPHRASE",
    "PROMPT_KINDS",
    "REWRITE",
    "counterfact_scores",
    "evaluate_counterfact",
]

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
    check_groups(groups)

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
