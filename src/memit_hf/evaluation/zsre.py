"""zsRE metrics (algorithm.md section 8.3): token-level, teacher-forced top-1 accuracy.

For every target token, the model sees the question and the target tokens before it; the token counts as correct
when it is the argmax of the next-token logits. Efficacy and paraphrase score `target_new` after the edited question
and its paraphrases; neighborhood (specificity) scores the dataset's own answer (`loc_ans`) after the unrelated NQ
question (`loc`), so even an unedited model stays well below 100. Each case averages all its tokens of a kind, then
the cases are averaged and multiplied by 100 ([`zsre_scores`]). [`evaluate_zsre`] runs every token of every request in
batched teacher-forced passes ([`~memit_hf.evaluation.scoring.target_token_hits`]).

The reference re-tokenises `question + decode(target[:i])` once per target token and compares the argmax with the
first id of `decode(target[i])` re-encoded; scoring the joint encoding of the question and the target in one pass is
the same test whenever decoding and re-encoding round-trip, which holds for the BPE tokenizers used here.
"""

from collections.abc import Hashable, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..requests import EditRequest
from .aggregation import NEIGHBORHOOD, PARAPHRASE, PROMPT_KINDS, REWRITE, check_groups, harmonic_mean, per_case_mean
from .scoring import target_token_hits


ZSRE_METRIC_KEYS = (
    "zsre_efficacy_accuracy",
    "zsre_paraphrase_accuracy",
    "zsre_neighborhood_accuracy",
    "zsre_score",
)
"""The keys of the dictionary returned by [`zsre_scores`] and [`evaluate_zsre`]."""

_KEY = {
    REWRITE: "zsre_efficacy_accuracy",
    PARAPHRASE: "zsre_paraphrase_accuracy",
    NEIGHBORHOOD: "zsre_neighborhood_accuracy",
}


def zsre_scores(
    token_hits: Sequence[torch.Tensor | Sequence[bool]], groups: Sequence[tuple[Hashable, str]]
) -> dict[str, float]:
    """The zsRE accuracies from per-token hits.

    For each prompt kind, the hits of all target tokens of a case's prompts of that kind are averaged, then the cases
    that have such a prompt are averaged, times 100. `zsre_score` is the harmonic mean of the three accuracies (the
    paper's zsRE Score, computed outside the reference's `summarize.py`).

    Args:
        token_hits (`Sequence` of `torch.Tensor` or `Sequence[bool]`, one per prompt):
            Whether each target token of the prompt is the teacher-forced argmax (see
            [`~memit_hf.evaluation.scoring.target_token_hits`]).
        groups (`Sequence[tuple[Hashable, str]]`, one per prompt):
            `(case, kind)` of each prompt, the kind one of `"rewrite"`, `"paraphrase"`, `"neighborhood"`.

    Returns:
        `dict[str, float]`: the accuracies under `ZSRE_METRIC_KEYS`, in percent; a kind without prompts (and then the
        score) is NaN.

    Raises:
        ValueError: when the inputs differ in length or a kind is unknown.
    """
    if len(token_hits) != len(groups):
        raise ValueError(
            f"`token_hits` and `groups` must have the same length (got {len(token_hits)} and {len(groups)})."
        )
    values: dict[str, list[torch.Tensor]] = {kind: [] for kind in PROMPT_KINDS}
    cases: dict[str, list[Hashable]] = {kind: [] for kind in PROMPT_KINDS}
    check_groups(groups)
    for hits, group in zip(token_hits, groups):
        hits = torch.as_tensor(hits, dtype=torch.float64).flatten()
        values[group[1]].append(hits)
        cases[group[1]].extend([group[0]] * len(hits))
    results = {}
    for kind in PROMPT_KINDS:
        flat = torch.cat(values[kind]) if values[kind] else torch.zeros(0, dtype=torch.float64)
        results[_KEY[kind]] = per_case_mean(flat, cases[kind]) * 100.0
    results["zsre_score"] = harmonic_mean([results[_KEY[kind]] for kind in PROMPT_KINDS])
    return {key: results[key] for key in ZSRE_METRIC_KEYS}


def evaluate_zsre(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: list[EditRequest],
    batch_size: int = 64,
    neighborhood_suffix: str = "?",
) -> dict[str, float]:
    """Run the zsRE token-accuracy tests (algorithm.md section 8.3) for `requests` on `model`.

    Each request contributes its question (`request.text`) and paraphrase prompts, scored with `target_new`, and its
    neighborhood prompts, scored with `neighborhood_target` (requests without one contribute no neighborhood
    prompt). All pairs go through one batched [`~memit_hf.evaluation.scoring.target_token_hits`] call.

    Args:
        model (`PreTrainedModel`):
            The (edited) causal language model.
        tokenizer (`PreTrainedTokenizerBase`):
            The model's tokenizer.
        requests (`list[EditRequest]`):
            The requests, e.g. zsRE records read by [`~memit_hf.requests.load_requests`].
        batch_size (`int`, *optional*, defaults to 64):
            Number of (prompt, target) pairs per forward pass.
        neighborhood_suffix (`str`, *optional*, defaults to `"?"`):
            Appended to each neighborhood prompt that does not already end with it: the reference zsRE loader scores
            `loc + "?"` (zsRE's NQ questions carry no question mark).

    Returns:
        `dict[str, float]`: the accuracies under `ZSRE_METRIC_KEYS`, in percent (see [`zsre_scores`]).

    Raises:
        ValueError: when `requests` is empty.
    """
    if not requests:
        raise ValueError("`evaluate_zsre` needs at least one request.")
    prompts: list[str] = []
    targets: list[str] = []
    groups: list[tuple[int, str]] = []
    for case, request in enumerate(requests):
        entries = [(request.text, request.target_new, REWRITE)]
        entries += [(prompt, request.target_new, PARAPHRASE) for prompt in request.paraphrase_prompts]
        if request.neighborhood_target:
            for prompt in request.neighborhood_prompts:
                if neighborhood_suffix and not prompt.endswith(neighborhood_suffix):
                    prompt = prompt + neighborhood_suffix
                entries.append((prompt, request.neighborhood_target, NEIGHBORHOOD))
        for prompt, target, kind in entries:
            prompts.append(prompt)
            targets.append(target)
            groups.append((case, kind))
    hits = target_token_hits(model, tokenizer, prompts, targets, batch_size)
    return zsre_scores(hits, groups)
