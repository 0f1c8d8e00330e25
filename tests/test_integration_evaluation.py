"""The batched CounterFact metrics on the real SmolLM2-135M-Instruct against a plain per-prompt implementation.

The plain implementation below follows the reference harness (algorithm.md section 8.1) literally: each prompt and
candidate is one unpadded sequence `tokenizer(prompt + " " + target)`, the target tokens are those after
`len(tokenizer(prompt))`, and the per-case aggregation is written out with Python loops. Both run in float64, so any
difference beyond rounding would be a bug in the batching, padding, position bookkeeping or aggregation.
"""

import math
from pathlib import Path

import pytest
import torch

from memit_hf.evaluation.counterfact import METRIC_KEYS, evaluate_counterfact
from memit_hf.models import load_default_model
from memit_hf.requests import load_requests


pytestmark = pytest.mark.integration

REQUESTS_FILE = Path(__file__).parent / "data" / "smollm2_counterfact.jsonl"
NUM_RECORDS = 3


def plain_score(model, tokenizer, prompt: str, target: str) -> tuple[float, bool]:
    """Mean NLL of ` target` after `prompt`, and whether each of its tokens is the argmax, one sequence alone."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    full_ids = tokenizer(prompt + " " + target)["input_ids"]
    assert full_ids[: len(prompt_ids)] == prompt_ids
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=torch.tensor([full_ids])).logits[0], dim=-1)
    nlls, hits = [], []
    for position in range(len(prompt_ids), len(full_ids)):
        nlls.append(-log_probs[position - 1, full_ids[position]].item())
        hits.append(int(log_probs[position - 1].argmax()) == full_ids[position])
    return sum(nlls) / len(nlls), all(hits)


def plain_counterfact(model, tokenizer, requests) -> dict[str, float]:
    sums = {key: 0.0 for key in METRIC_KEYS if key != "score"}
    for request in requests:
        kinds = {
            "efficacy": [request.text],
            "paraphrase": request.paraphrase_prompts,
            "neighborhood": request.neighborhood_prompts,
        }
        for name, prompts in kinds.items():
            success = magnitude = accuracy = 0.0
            for prompt in prompts:
                nll_new, new_ok = plain_score(model, tokenizer, prompt, request.target_new)
                nll_true, true_ok = plain_score(model, tokenizer, prompt, request.target_true)
                if name == "neighborhood":
                    success += nll_true < nll_new
                    magnitude += math.exp(-nll_true) - math.exp(-nll_new)
                    accuracy += true_ok
                else:
                    success += nll_new < nll_true
                    magnitude += math.exp(-nll_new) - math.exp(-nll_true)
                    accuracy += new_ok
            sums[f"{name}_success"] += success / len(prompts)
            sums[f"{name}_magnitude"] += magnitude / len(prompts)
            sums[f"{name}_accuracy"] += accuracy / len(prompts)
    results = {key: 100.0 * value / len(requests) for key, value in sums.items()}
    es, ps, ns = results["efficacy_success"], results["paraphrase_success"], results["neighborhood_success"]
    results["score"] = 0.0 if 0.0 in (es, ps, ns) else 3 / (1 / es + 1 / ps + 1 / ns)
    return results


def test_batched_counterfact_metrics_match_a_plain_per_prompt_implementation():
    model, tokenizer = load_default_model(dtype=torch.float64)
    requests = load_requests(REQUESTS_FILE)[:NUM_RECORDS]
    # Shift target_true's odds so that the success rates are not all 0 or 100 (the model knows these facts).
    for request in requests[::2]:
        request.target_new, request.target_true = request.target_true, request.target_new
    batched = evaluate_counterfact(model, tokenizer, requests, batch_size=64)
    plain = plain_counterfact(model, tokenizer, requests)
    assert 0.0 < batched["efficacy_success"] < 100.0 and 0.0 < batched["neighborhood_success"] < 100.0
    for key in METRIC_KEYS:
        assert batched[key] == pytest.approx(plain[key], abs=1e-6, rel=0), key
