"""The registry of editing algorithms: one line per method, naming its configuration class (torch-free).

A method is a folder `algorithms/<name>/` holding `__init__.py`, `config.py` (a dataclass subclassing
[`~memit_hf.algorithms.AlgorithmConfig`] whose `name` is the registry name and whose `implementation` names the
algorithm class, e.g. `".algorithm:MEMIT"`) and `algorithm.py` (the [`~memit_hf.algorithms.EditAlgorithm`]
subclass). Registering it is adding one line `"<name>.config:<Name>Config",` to [`REGISTERED_CONFIGS`] below; the
arguments, the recipes, the command-line flags and the [`~memit_hf.Editor`] find it through [`ALGORITHM_CONFIGS`] and
[`get_algorithm`]. The algorithm class (which imports torch) is imported on first use.
"""

import importlib
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from .config import AlgorithmConfig


if TYPE_CHECKING:
    from .base import EditAlgorithm


REGISTERED_CONFIGS = (
    "memit.config:MEMITConfig",
    "rome.config:ROMEConfig",
    "memit_seq.config:MEMITSeqConfig",
    "emmet.config:EMMETConfig",
    "alphaedit.config:AlphaEditConfig",
)
"""Every registered method, as `"<module>:<configuration class>"` relative to this package (one line per method)."""


def load_config_class(path: str) -> type[AlgorithmConfig]:
    """Import the configuration class named by `"<module>:<class>"` (relative to `memit_hf.algorithms`).

    Raises:
        TypeError: if it is not an [`AlgorithmConfig`] subclass with a `name`.
    """
    module, _, name = path.partition(":")
    config = getattr(importlib.import_module(f".{module}", __package__), name)
    if not (isinstance(config, type) and issubclass(config, AlgorithmConfig) and config.name):
        raise TypeError(f"`{path}` must name an `AlgorithmConfig` subclass that sets `name`.")
    return config


ALGORITHM_CONFIGS: Mapping[str, type[AlgorithmConfig]] = MappingProxyType(
    {config.name: config for config in map(load_config_class, REGISTERED_CONFIGS)}
)
"""Registered algorithms by name (read-only): their configuration classes."""

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


class AlgorithmClasses(Mapping):
    """Registered algorithm classes by name (read-only), each imported on first look-up from its configuration's
    `implementation`."""

    def __getitem__(self, name: str) -> type["EditAlgorithm"]:
        if name not in ALGORITHM_CONFIGS:
            raise KeyError(name)
        return ALGORITHM_CONFIGS[name].algorithm_class()

    def __iter__(self) -> Iterator[str]:
        return iter(ALGORITHM_CONFIGS)

    def __len__(self) -> int:
        return len(ALGORITHM_CONFIGS)

    def __repr__(self) -> str:
        return f"AlgorithmClasses({list(ALGORITHM_CONFIGS)})"


ALGORITHMS = AlgorithmClasses()
"""Registered algorithm classes by name (read-only); every name of [`ALGORITHM_CONFIGS`] has one."""


def get_algorithm(name: str, config: AlgorithmConfig | dict[str, Any] | None = None) -> "EditAlgorithm":
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
    return config_class.algorithm_class()(config)
