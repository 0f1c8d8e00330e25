"""Closed-form weight updates: MEMIT's least squares and ROME's equality-constrained (rank-one per fact) update."""

from .base import EditAlgorithm, IllConditionedError, cholesky_factor
from .memit import MEMIT
from .rome import ROME


ALGORITHMS: dict[str, type[EditAlgorithm]] = {"memit": MEMIT, "rome": ROME}


def get_algorithm(name: str) -> EditAlgorithm:
    """Instantiate the algorithm registered under `name`.

    Raises:
        ValueError: if `name` is unknown.
    """
    if name not in ALGORITHMS:
        raise ValueError(f"Unknown algorithm `{name}`; choose one of {sorted(ALGORITHMS)}.")
    return ALGORITHMS[name]()


__all__ = ["ALGORITHMS", "MEMIT", "ROME", "EditAlgorithm", "IllConditionedError", "cholesky_factor", "get_algorithm"]
