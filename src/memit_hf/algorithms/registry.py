"""The registry of editing algorithms: name -> configuration class (torch-free). Adding a method is adding a folder
`algorithms/<name>/` (config.py, algorithm.py) and one entry here."""

from types import MappingProxyType

from .alphaedit.config import AlphaEditConfig
from .config import AlgorithmConfig
from .emmet.config import EMMETConfig
from .memit.config import MEMITConfig
from .memit_seq.config import MEMITSeqConfig
from .rome.config import ROMEConfig


ALGORITHM_CONFIGS = MappingProxyType(
    {config.name: config for config in (MEMITConfig, ROMEConfig, MEMITSeqConfig, EMMETConfig, AlphaEditConfig)}
)
"""Registered algorithms by name (read-only)."""

ALGORITHM_NAMES = tuple(ALGORITHM_CONFIGS)


def get_config_class(name: str) -> type[AlgorithmConfig]:
    """The configuration class of the algorithm registered under `name`.

    Raises:
        ValueError: if `name` is unknown.
    """
    if name not in ALGORITHM_CONFIGS:
        raise ValueError(f"Unknown algorithm `{name}`; choose one of {sorted(ALGORITHM_CONFIGS)}.")
    return ALGORITHM_CONFIGS[name]


def method_field_names() -> tuple[str, ...]:
    """Every hyperparameter name of every registered method, each once (the CLI's method flags)."""
    names: dict[str, None] = {}
    for config in ALGORITHM_CONFIGS.values():
        names.update(dict.fromkeys(config.field_names()))
    return tuple(names)
