"""The algorithm classes by registry name (imports torch; the torch-free registry of configurations is
`registry.py`)."""

from types import MappingProxyType

from .alphaedit.algorithm import AlphaEdit
from .base import EditAlgorithm
from .config import AlgorithmConfig
from .emmet.algorithm import EMMET
from .memit.algorithm import MEMIT
from .memit_seq.algorithm import MEMITSeq
from .registry import get_config_class
from .rome.algorithm import ROME


ALGORITHMS = MappingProxyType({cls.config_class.name: cls for cls in (MEMIT, ROME, MEMITSeq, EMMET, AlphaEdit)})
"""Registered algorithm classes by name (read-only); every name of `ALGORITHM_CONFIGS` has one."""


def get_algorithm(name: str, config: AlgorithmConfig | dict | None = None) -> EditAlgorithm:
    """Instantiate the algorithm registered under `name` with `config` (an instance, a dict of its fields, or
    `None` for the defaults).

    Raises:
        ValueError: if `name` is unknown or `config` belongs to another method.
    """
    config_class = get_config_class(name)
    if not isinstance(config, AlgorithmConfig):
        config = config_class.from_dict(config)
    elif not isinstance(config, config_class):
        raise ValueError(f"`{name}` needs a `{config_class.__name__}`, got a `{type(config).__name__}`.")
    return ALGORITHMS[name](config)
