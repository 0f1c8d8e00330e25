"""CounterFact metrics of MEMIT (algorithm.md section 8) as an `evaluate` metric.

Load it with `memit_hf.load_metric("counterfact")` or `evaluate.load(memit_hf.metrics.metric_path("counterfact"))`.
"""

import datasets
import evaluate

from memit_hf.evaluation.counterfact import counterfact_scores
from memit_hf.evaluation.generation import generation_entropy, reference_score


_DESCRIPTION = """\
CounterFact efficacy, paraphrase and neighborhood success (ES, PS, NS), their magnitudes (EM, PM, NM) and accuracies,
and Score, the harmonic mean of ES, PS and NS, all in percent, from per-prompt teacher-forced NLLs (as the MEMIT
evaluation harness computes them). Optionally the generation entropy (GE) and reference score (RS) of sampled texts.
"""

_KWARGS_DESCRIPTION = """
Args:
    nll_new (`list[float]`): mean per-token NLL of ` target_new` after each prompt.
    nll_true (`list[float]`): mean per-token NLL of the true target (the neighborhood answer for neighborhood
        prompts) after each prompt.
    new_correct (`list[bool]`): whether every token of `target_new` is the argmax.
    true_correct (`list[bool]`): whether every token of the true target is the argmax.
    case (`list[int]`): the case (edit) of each prompt, e.g. its position in the request list.
    kind (`list[str]`): `"rewrite"`, `"paraphrase"` or `"neighborhood"`.
    generated_texts (`list[list[str]]`, *optional*): per case, texts sampled after its generation prompts; adds
        `generation_entropy`.
    reference_texts (`list[list[str]]`, *optional*): per case, reference texts; with `generated_texts`, adds
        `reference_score`.
Returns:
    `efficacy_success`, `paraphrase_success`, `neighborhood_success`, `efficacy_magnitude`, `paraphrase_magnitude`,
    `neighborhood_magnitude`, `efficacy_accuracy`, `paraphrase_accuracy`, `neighborhood_accuracy`, `score`
    (percent), and `generation_entropy` / `reference_score` when texts are given.
Examples:
    >>> import memit_hf
    >>> metric = memit_hf.load_metric("counterfact")
    >>> results = metric.compute(nll_new=[1.0, 0.5, 3.0], nll_true=[2.0, 1.0, 1.0], new_correct=[True, True, False],
    ...                          true_correct=[False, False, True], case=[0, 0, 0],
    ...                          kind=["rewrite", "paraphrase", "neighborhood"])
    >>> results["score"]
    100.0
"""

_CITATION = """\
@inproceedings{meng2023memit,
  title     = {Mass-Editing Memory in a Transformer},
  author    = {Kevin Meng and Arnab Sen Sharma and Alex Andonian and Yonatan Belinkov and David Bau},
  booktitle = {The Eleventh International Conference on Learning Representations (ICLR)},
  year      = {2023}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CounterFact(evaluate.Metric):
    """The CounterFact metrics; see the module docstring."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "nll_new": datasets.Value("float64"),
                    "nll_true": datasets.Value("float64"),
                    "new_correct": datasets.Value("bool"),
                    "true_correct": datasets.Value("bool"),
                    "case": datasets.Value("int64"),
                    "kind": datasets.Value("string"),
                }
            ),
            reference_urls=["https://github.com/kmeng01/memit", "https://huggingface.co/papers/2210.07229"],
        )

    def _compute(
        self,
        nll_new: list[float],
        nll_true: list[float],
        new_correct: list[bool],
        true_correct: list[bool],
        case: list[int],
        kind: list[str],
        generated_texts: list[list[str]] | None = None,
        reference_texts: list[list[str]] | None = None,
    ) -> dict[str, float]:
        results = counterfact_scores(nll_new, nll_true, new_correct, true_correct, list(zip(case, kind)))
        if generated_texts is not None:
            results["generation_entropy"] = generation_entropy(generated_texts)
            if reference_texts is not None:
                results["reference_score"] = reference_score(generated_texts, reference_texts)
        return results
