"""Tests of `memit_hf.metrics`: the CounterFact and zsRE metrics as local `evaluate` modules, loaded offline."""

import math
import os

import evaluate
import pytest

from memit_hf import load_metric
from memit_hf.evaluation import counterfact_scores, generation_entropy, reference_score, zsre_scores
from memit_hf.metrics import AVAILABLE_METRICS, metric_path


ROWS = [
    # (case, kind, nll_new, nll_true, new_correct, true_correct)
    (10, "rewrite", 1.0, 2.0, True, False),
    (10, "paraphrase", 0.5, 1.0, True, False),
    (3, "rewrite", 2.0, 1.5, False, True),
    (10, "paraphrase", 2.0, 1.0, False, True),
    (10, "neighborhood", 3.0, 1.0, False, True),
    (3, "paraphrase", 0.1, 0.2, True, False),
    (3, "neighborhood", 1.0, 2.0, True, False),
]
INPUTS = {
    "case": [r[0] for r in ROWS],
    "kind": [r[1] for r in ROWS],
    "nll_new": [r[2] for r in ROWS],
    "nll_true": [r[3] for r in ROWS],
    "new_correct": [r[4] for r in ROWS],
    "true_correct": [r[5] for r in ROWS],
}


@pytest.fixture(scope="module", autouse=True)
def _modules_cache(tmp_path_factory):
    """`evaluate` copies local scripts into its modules cache and makes a data folder per metric: keep both out of
    the user's cache."""
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set by conftest: loading must not need the Hub
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluate.config, "HF_MODULES_CACHE", str(tmp_path_factory.mktemp("modules")))
        patch.setattr(evaluate.config, "HF_METRICS_CACHE", str(tmp_path_factory.mktemp("metrics")))
        yield


def expected_counterfact():
    groups = list(zip(INPUTS["case"], INPUTS["kind"]))
    return counterfact_scores(
        INPUTS["nll_new"], INPUTS["nll_true"], INPUTS["new_correct"], INPUTS["true_correct"], groups
    )


def test_counterfact_metric_loads_offline_and_matches_the_function():
    metric = load_metric("counterfact", keep_in_memory=True)
    assert isinstance(metric, evaluate.EvaluationModule) and type(metric).__name__ == "CounterFact"
    results = metric.compute(**INPUTS)
    assert results == pytest.approx(expected_counterfact())
    assert results["efficacy_success"] == pytest.approx(50.0) and results["paraphrase_success"] == pytest.approx(75.0)
    assert results["neighborhood_success"] == pytest.approx(50.0)


def test_counterfact_metric_streams_batches_and_scores_generations():
    metric = evaluate.load(metric_path("counterfact"), keep_in_memory=True)  # the plain `evaluate` route
    for start in (0, 3, 5):
        metric.add_batch(**{name: values[start : start + (3 if start == 0 else 2)] for name, values in INPUTS.items()})
    generated = [["Rome is a city in Italy", "the the the"], ["Paris bakery bread"]]
    references = [["Rome is a city in Italy"], ["Berlin wall"]]
    results = metric.compute(generated_texts=generated, reference_texts=references)
    assert {key: results[key] for key in expected_counterfact()} == pytest.approx(expected_counterfact())
    assert results["generation_entropy"] == pytest.approx(generation_entropy(generated))
    assert results["reference_score"] == pytest.approx(reference_score(generated, references))
    assert results["reference_score"] == pytest.approx(50.0)


def test_zsre_metric():
    metric = load_metric("zsre", keep_in_memory=True)
    token_hits = [[True, False, True, True], [False, False], [True, True], [False], [True]]
    case = [0, 0, 0, 1, 1]
    kind = ["rewrite", "paraphrase", "neighborhood", "rewrite", "paraphrase"]
    results = metric.compute(token_hits=token_hits, case=case, kind=kind)
    assert results == pytest.approx(zsre_scores(token_hits, list(zip(case, kind))))
    assert results["zsre_efficacy_accuracy"] == pytest.approx(100 * (3 / 4 + 0) / 2)
    assert results["zsre_paraphrase_accuracy"] == pytest.approx(50.0)
    assert results["zsre_neighborhood_accuracy"] == pytest.approx(100.0)
    assert not math.isnan(results["zsre_score"])


def test_unknown_metric_name():
    assert AVAILABLE_METRICS == ("counterfact", "zsre")
    with pytest.raises(ValueError, match="choose from"):
        load_metric("bleu")
