"""Sequential editing on the real SmolLM2-135M-Instruct: two batches of 10 edits with the accumulated-key MEMIT
(`memit_seq`, the method the README recommends for a stream of batches). After the second batch the first batch's
edits still hold, the state saved to disk continues in a fresh editor on a freshly loaded model with the same
weights, and a rollback gives back the weights after the first batch bit for bit.

The requests and statistics corpus are those of `test_integration.py` (facts the unedited model knows).
"""

from pathlib import Path

import pytest
import torch

from memit_hf.arguments import EditingArguments
from memit_hf.editor import Editor
from memit_hf.models import load_default_model
from memit_hf.requests import load_requests


pytestmark = pytest.mark.integration

DATA = Path(__file__).parent / "data"
MIN_EFFICACY = 95.0  # the sequential-editing issue's bar for efficacy after many batches


def _edited_weights(model, names) -> dict[str, torch.Tensor]:
    return {name: model.get_submodule(name).weight.detach().clone() for name in names}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    model, tokenizer = load_default_model()
    requests = load_requests(DATA / "smollm2_counterfact.jsonl")
    first, second = requests[:10], requests[10:20]
    args = EditingArguments(
        algorithm="memit_seq",
        stats_num_tokens=20_000,
        stats_cache_dir=str(tmp_path_factory.mktemp("stats")),
        num_context_templates=2,
        seed=0,
    )
    editor = Editor(model, args=args, processing_class=tokenizer, stats_dataset=[DATA / "stats_corpus.txt"])
    editor.edit(first)
    names = [editor.layout.edit_name(layer) for layer in editor.resolved_args.layers]
    after_first = _edited_weights(model, names)
    first_alone = editor.evaluate(first, include_pre=False)
    state_dir = tmp_path_factory.mktemp("state")
    editor.save_state(state_dir)
    editor.edit(second)
    after_second = _edited_weights(model, names)
    results = {
        "first_alone": first_alone,
        "first_after_second": editor.evaluate(first, include_pre=False),
        "second": editor.evaluate(second, include_pre=False),
        "key_gram": {key: value.clone() for key, value in editor.algorithm.state_dict().items()},
    }
    editor.rollback()
    results["rolled_back"] = _edited_weights(model, names)
    results["after_first"] = after_first

    # A fresh model and editor continue the saved state and edit the second batch again.
    fresh_model, _ = load_default_model()
    continued = Editor.from_state(
        fresh_model, state_dir, args=args, processing_class=tokenizer, stats_dataset=[DATA / "stats_corpus.txt"]
    )
    continued.edit(second)
    results["continued"] = _edited_weights(fresh_model, names)
    results["after_second"] = after_second
    return results


def test_the_first_batch_still_holds_after_the_second(run):
    assert run["first_alone"]["efficacy_success"] >= MIN_EFFICACY
    assert run["first_after_second"]["efficacy_success"] >= MIN_EFFICACY
    assert run["second"]["efficacy_success"] >= MIN_EFFICACY
    assert run["key_gram"]  # one accumulated Gram per edited layer


def test_rollback_gives_back_the_weights_after_the_first_batch_bit_for_bit(run):
    for name, weight in run["after_first"].items():
        assert torch.equal(run["rolled_back"][name], weight), name


def test_the_saved_state_continues_in_a_fresh_editor(run):
    # The same operations on the same inputs in the same process: equal to float32 rounding of the update, well
    # inside the 1e-6 relative bound.
    for name, weight in run["after_second"].items():
        continued = run["continued"][name]
        assert float((continued - weight).norm() / weight.norm()) < 1e-6, name
