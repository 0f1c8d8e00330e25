"""The memit-hf metrics as local `evaluate` modules, loaded from the installed package and never from the Hub.

Each metric is a folder holding an `evaluate` script of the same name (`counterfact/counterfact.py`,
`zsre/zsre.py`), so `evaluate.load(metric_path("counterfact"))` works like loading any local metric script, and
[`load_metric`] does it for you:

```python
>>> from memit_hf import load_metric
>>> counterfact = load_metric("counterfact")
>>> counterfact.compute(nll_new=[0.5, 2.0, 1.0], nll_true=[1.0, 1.0, 3.0], new_correct=[True, False, False],
...                     true_correct=[False, True, True], case=[0, 0, 0],
...                     kind=["rewrite", "paraphrase", "neighborhood"])["score"]
0.0
```
"""

from pathlib import Path
from typing import Any


METRICS_DIR = Path(__file__).resolve().parent
AVAILABLE_METRICS = ("counterfact", "zsre")
"""Names accepted by [`load_metric`] and [`metric_path`]."""


def metric_path(name: str) -> str:
    """Path of the folder of the metric `name`, for `evaluate.load(path)`.

    Raises:
        ValueError: when `name` is not one of `AVAILABLE_METRICS`.
    """
    if name not in AVAILABLE_METRICS:
        raise ValueError(f"Unknown memit-hf metric {name!r}; choose from {AVAILABLE_METRICS}.")
    return str(METRICS_DIR / name)


def load_metric(name: str, **kwargs: Any) -> Any:
    """Load a memit-hf metric as an `evaluate.EvaluationModule` from the package's own files (works offline).

    Args:
        name (`str`):
            `"counterfact"` (ES / PS / NS, magnitudes, accuracies, Score; GE and RS from generated texts) or `"zsre"`
            (token-level accuracies and their harmonic mean).
        **kwargs:
            Passed to `evaluate.load` (e.g. `keep_in_memory=True`, `experiment_id=...`).

    Returns:
        `evaluate.EvaluationModule`: the metric; call `.compute(...)` or `.add_batch(...)` then `.compute()`.
    """
    import evaluate

    return evaluate.load(metric_path(name), **kwargs)
