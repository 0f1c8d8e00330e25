"""Editing algorithms, one folder per method (`memit/`, `rome/`, ...), each with a configuration dataclass and an
algorithm object implementing [`EditAlgorithm`]: `prepare` (derived quantities per statistics fingerprint), `solve`
(exact low-rank factors) and per-layer state committed only when a whole edit succeeds. `registry.py` lists the
methods (one line each; see its docstring).

The registry and the configurations import no torch; the algorithm classes load on first access.
"""

from typing import TYPE_CHECKING

from .alphaedit.config import AlphaEditConfig
from .config import AlgorithmConfig, CovarianceConfig
from .emmet.config import EMMETConfig
from .memit.config import MEMITConfig
from .memit_seq.config import MEMITSeqConfig
from .registry import (
    ALGORITHM_CONFIGS,
    ALGORITHM_NAMES,
    ALGORITHMS,
    REGISTERED_CONFIGS,
    AlgorithmClasses,
    get_algorithm,
    get_config_class,
    method_field_names,
)
from .rome.config import ROMEConfig


_LAZY = {
    "EditAlgorithm": "base",
    "equality_constrained_update": "base",
    "IllConditionedError": "base",
    "LayerProblem": "base",
    "cholesky_factor": "base",
    "MEMIT": "memit.algorithm",
    "ROME": "rome.algorithm",
    "MEMITSeq": "memit_seq.algorithm",
    "EMMET": "emmet.algorithm",
    "AlphaEdit": "alphaedit.algorithm",
}

__all__ = [
    "ALGORITHMS",
    "ALGORITHM_CONFIGS",
    "ALGORITHM_NAMES",
    "EMMET",
    "MEMIT",
    "ROME",
    "AlgorithmClasses",
    "AlgorithmConfig",
    "AlphaEdit",
    "AlphaEditConfig",
    "EMMETConfig",
    "MEMITSeq",
    "MEMITSeqConfig",
    "EditAlgorithm",
    "IllConditionedError",
    "LayerProblem",
    "MEMITConfig",
    "ROMEConfig",
    "REGISTERED_CONFIGS",
    "CovarianceConfig",
    "cholesky_factor",
    "equality_constrained_update",
    "get_algorithm",
    "get_config_class",
    "method_field_names",
]

if TYPE_CHECKING:
    from .alphaedit.algorithm import AlphaEdit
    from .base import EditAlgorithm, IllConditionedError, LayerProblem, cholesky_factor, equality_constrained_update
    from .emmet.algorithm import EMMET
    from .memit.algorithm import MEMIT
    from .memit_seq.algorithm import MEMITSeq
    from .rome.algorithm import ROME


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
