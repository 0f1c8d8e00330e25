"""zsRE token-level accuracy of MEMIT (algorithm.md section 8.3) as an `evaluate` metric.

Load it with `memit_hf.load_metric("zsre")` or `evaluate.load(memit_hf.metrics.metric_path("zsre"))`.
"""

import datasets
import evaluate

from memit_hf.evaluation.zsre import zsre_scores


_DESCRIPTION = """\
zsRE efficacy, paraphrase and neighborhood (specificity) accuracy in percent: the fraction of target tokens that are
the teacher-forced argmax, averaged within each case and then over cases, as the MEMIT evaluation harness computes
them, and their harmonic mean (`zsre_score`).
"""

_KWARGS_DESCRIPTION = """
Args:
    token_hits (`list[list[bool]]`): per prompt, whether each target token is the teacher-forced argmax.
    case (`list[int]`): the case (edit) of each prompt, e.g. its position in the request list.
    kind (`list[str]`): `"rewrite"`, `"paraphrase"` or `"neighborhood"`.
Returns:
    `zsre_efficacy_accuracy`, `zsre_paraphrase_accuracy`, `zsre_neighborhood_accuracy`, `zsre_score`.
Examples:
    >>> import memit_hf
    >>> metric = memit_hf.load_metric("zsre")
    >>> metric.compute(token_hits=[[True, False], [True], [False, False, True]], case=[0, 0, 0],
    ...                kind=["rewrite", "paraphrase", "neighborhood"])["zsre_efficacy_accuracy"]
    50.0
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
class Zsre(evaluate.Metric):
    """The zsRE token accuracies; see the module docstring."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "token_hits": datasets.Sequence(datasets.Value("bool")),
                    "case": datasets.Value("int64"),
                    "kind": datasets.Value("string"),
                }
            ),
            reference_urls=["https://github.com/kmeng01/memit", "https://huggingface.co/papers/2210.07229"],
        )

    def _compute(self, token_hits: list[list[bool]], case: list[int], kind: list[str]) -> dict[str, float]:
        return zsre_scores(token_hits, list(zip(case, kind)))
