"""The base class of every algorithm's configuration (torch-free, so that argument parsing stays light)."""

from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar


@dataclass
class AlgorithmConfig:
    """Hyperparameters of one editing algorithm; each method subclasses it in `algorithms/<name>/config.py`.

    Class attributes:
        name (`str`): the registry name (`EditingArguments(algorithm=name)`).
        num_layers (`int` or `None`): how many layers the method edits (`None`: any number).
        default_layers_fraction (`float`): where the default layers start, as a fraction of the depth.
        paper (`str`): the method's paper, cited in model cards.
    """

    name: ClassVar[str] = ""
    num_layers: ClassVar[int | None] = None
    default_layers_fraction: ClassVar[float] = 0.1
    paper: ClassVar[str] = ""

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> "AlgorithmConfig":
        """Build the config from a mapping of its field names.

        Raises:
            ValueError: naming the keys that are not hyperparameters of this method.
        """
        values = dict(values or {})
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ValueError(
                f"`algorithm_config` has {unknown}, which are not hyperparameters of `{cls.name}`; its fields are "
                f"{list(cls.field_names())}."
            )
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
