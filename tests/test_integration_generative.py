"""The generative and multi-hop metric families on the real SmolLM2-135M-Instruct.

Six CounterFact-style facts the unedited model knows (`tests/data/smollm2_counterfact.jsonl`) are edited with the
library's defaults and the quickstart's offline statistics (32 texts of 96 tokens sampled from the model), then
evaluated with include_pre: the unedited model never says the counterfactual objects, plainly or as a chat assistant,
and is its own neighborhood reference; the edited one says them under greedy decoding, through the chat template too,
without naming them after the neighborhood prompts. The MQuAKE sample (`tests/data/mquake_cf_sample.jsonl`, three
cases of MQuAKE-CF, MIT) is scored on the unedited model: no metric credits it with the counterfactual answers.
"""

from pathlib import Path

import pytest

from memit_hf.arguments import EditingArguments
from memit_hf.editor import Editor
from memit_hf.evaluation import evaluate_multihop, greedy_continuations
from memit_hf.models import load_default_model
from memit_hf.requests import load_requests


pytestmark = pytest.mark.integration

DATA = Path(__file__).parent / "data"
NUM_RECORDS = 6


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    model, tokenizer = load_default_model()
    requests = load_requests(DATA / "smollm2_counterfact.jsonl")[:NUM_RECORDS]
    args = EditingArguments(
        seed=0, stats_sample_texts=32, stats_sample_length=96, stats_cache_dir=str(tmp_path_factory.mktemp("stats"))
    )
    editor = Editor(model, args=args, processing_class=tokenizer, stats_dataset=None)
    mquake = evaluate_multihop(model, tokenizer, load_requests(DATA / "mquake_cf_sample.jsonl"))
    neighbors = [prompt for r in requests for prompt in r.neighborhood_prompts]
    unedited_neighbors = greedy_continuations(model, tokenizer, neighbors)
    editor.edit(requests)
    metrics = editor.evaluate(requests, metrics=["counterfact", "generative"])
    edited_neighbors = greedy_continuations(model, tokenizer, neighbors)
    editor.restore()
    return {
        "model": model,
        "tokenizer": tokenizer,
        "requests": requests,
        "metrics": metrics,
        "mquake": mquake,
        "unedited_neighbors": unedited_neighbors,
        "edited_neighbors": edited_neighbors,
    }


def test_the_unedited_model_never_says_the_new_objects(run):
    metrics = run["metrics"]
    for key in ("gen_efficacy_prefix", "gen_efficacy_contains", "gen_paraphrase_contains", "chat_efficacy_contains"):
        assert metrics[f"pre_{key}"] == 0.0, key
    assert metrics["pre_gen_neighborhood_bleed"] == metrics["pre_chat_neighborhood_bleed"] == 0.0
    # Without an edit the model is its own neighborhood reference.
    assert metrics["pre_gen_neighborhood_first_word"] == metrics["pre_chat_neighborhood_unchanged"] == 100.0


def test_the_edited_model_says_the_new_objects(run):
    metrics = run["metrics"]
    assert metrics["efficacy_success"] == 100.0  # teacher-forced
    assert metrics["gen_efficacy_prefix"] >= 80.0  # greedy: the continuation starts with the new object
    assert metrics["gen_paraphrase_contains"] >= 75.0
    assert metrics["chat_efficacy_contains"] >= 80.0  # through the chat template
    assert metrics["gen_neighborhood_bleed"] <= 20.0 and metrics["chat_neighborhood_bleed"] <= 20.0


def test_neighborhood_stability_is_measured_against_the_unedited_model(run):
    before, after = run["unedited_neighbors"], run["edited_neighbors"]
    unchanged = 100 * sum(a == b for a, b in zip(after, before)) / len(before)
    per_case = run["metrics"]["gen_neighborhood_unchanged"]
    # Every request has three neighbors, so the per-case mean is the plain mean.
    assert {len(r.neighborhood_prompts) for r in run["requests"]} == {3}
    assert per_case == pytest.approx(unchanged)
    assert per_case < 100.0  # 16 greedy tokens rarely survive an edit of the same relation untouched


def test_multihop_on_the_unedited_model(run):
    mquake = run["mquake"]
    for key in ("multihop_success", "multihop_alias_success", "gen_multihop_accuracy", "chat_multihop_accuracy"):
        assert mquake[key] == 0.0, key
