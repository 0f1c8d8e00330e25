"""Per-case aggregation shared by the metric families: the prompt kinds of a case, the per-case mean and the
harmonic mean.

Every metric of the reference harness is a per-item value (a prompt, or a target token) averaged within each case,
then across cases ([`per_case_mean`]); the CounterFact and zsRE scores are harmonic means ([`harmonic_mean`]) of the
efficacy, paraphrase and neighborhood figures. Items are labelled by `(case, kind)` pairs, the kind one of
`PROMPT_KINDS` ([`check_groups`]). This module imports no other evaluation module.
"""

import math
from collections.abc import Hashable, Iterable, Sequence

import torch


REWRITE = "rewrite"
PARAPHRASE = "paraphrase"
NEIGHBORHOOD = "neighborhood"
PROMPT_KINDS = (REWRITE, PARAPHRASE, NEIGHBORHOOD)
"""The kinds of prompt a case holds, as used in the `groups` of [`~memit_hf.evaluation.counterfact_scores`] and
[`~memit_hf.evaluation.zsre_scores`]."""


def check_groups(groups: Sequence[tuple[Hashable, str]]) -> None:
    """Check that every entry of `groups` is a `(case, kind)` pair with `kind` in `PROMPT_KINDS`.

    Args:
        groups (`Sequence[tuple[Hashable, str]]`):
            One `(case, kind)` pair per prompt.

    Raises:
        ValueError: naming the first entry that is not such a pair.
    """
    for position, group in enumerate(groups):
        if len(group) != 2 or group[1] not in PROMPT_KINDS:
            raise ValueError(
                f"`groups[{position}]` must be a `(case, kind)` pair with kind in {PROMPT_KINDS} (got {group!r})."
            )


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


def per_case_rate(values: Iterable[bool], cases: Sequence[Hashable]) -> float:
    """[`per_case_mean`] of yes/no outcomes, in percent (how the generative and wild families report rates).

    Args:
        values (`Iterable[bool]`): one outcome per item.
        cases (`Sequence[Hashable]`): the case each item belongs to.

    Returns:
        `float`: the mean over cases of each case's share of `True`, times 100 (NaN when there is no item).
    """
    return per_case_mean([float(value) for value in values], cases) * 100.0


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean of non-negative numbers, as `scipy.stats.hmean` gives it for the reference's Score.

    Args:
        values (`Sequence[float]`):
            The numbers, e.g. ES, PS and NS in percent.

    Returns:
        `float`: NaN if a value is NaN (or there is none), 0 if a value is 0, else `len(values) / sum(1 / v)`.
    """
    values = [float(value) for value in values]
    if not values or any(math.isnan(value) for value in values):
        return math.nan
    if any(value == 0.0 for value in values):
        return 0.0
    return len(values) / sum(1.0 / value for value in values)
