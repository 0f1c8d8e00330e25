"""The base classes of the algorithms' configurations (torch-free, so that argument parsing stays light)."""

import importlib
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, ClassVar


@dataclass
class AlgorithmConfig:
    """Hyperparameters of one editing algorithm; each method subclasses it in `algorithms/<name>/config.py`.

    Class attributes:
        name (`str`): the registry name (`EditingArguments(algorithm=name)`).
        implementation (`str`):
            The algorithm class as `"<module>:<class>"`, relative to the package of the configuration's module (e.g.
            `".algorithm:MEMIT"`); imported only when an algorithm is built (see [`algorithm_class`]).
        num_layers (`int` or `None`): how many layers the method edits (`None`: any number).
        default_layers_fraction (`float`): where the default layers start, as a fraction of the depth.
        paper (`str`): the method's paper, cited in model cards.
    """

    name: ClassVar[str] = ""
    implementation: ClassVar[str] = ""
    num_layers: ClassVar[int | None] = None
    default_layers_fraction: ClassVar[float] = 0.1
    paper: ClassVar[str] = ""

    @classmethod
    def algorithm_class(cls) -> type:
        """Import the algorithm class named by `implementation`.

        Raises:
            TypeError: if that class does not take this configuration (`config_class`).
        """
        module, _, name = cls.implementation.partition(":")
        algorithm = getattr(importlib.import_module(module, package=cls.__module__.rpartition(".")[0]), name)
        if getattr(algorithm, "config_class", None) is not cls:
            raise TypeError(
                f"`{cls.__name__}.implementation` names `{algorithm.__name__}`, whose `config_class` is not "
                f"`{cls.__name__}`."
            )
        return algorithm

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

    @classmethod
    def upgrade_saved(cls, values: dict[str, Any]) -> dict[str, Any]:
        """A configuration saved by an earlier memit-hf (an editor state's), in today's fields, with the meaning it had
        when it was saved: a method whose defaults changed meaning fills the fields added since with the old one.

        Args:
            values (`dict[str, Any]`): the saved fields.

        Returns:
            `dict[str, Any]`: a copy to build the configuration from: fields added since it was saved take their
            defaults (which keep the old behaviour unless a method overrides this).
        """
        added = {f.name: f.default for f in fields(cls) if f.name not in values and f.default is not MISSING}
        return dict(values) | added


@dataclass
class CovarianceConfig(AlgorithmConfig):
    """The configuration of a method whose preserved term is `lambda C0`, the preserved keys' second moment weighed
    against the new keys (MEMIT, its sequential form, EMMET).

    Args:
        mom2_update_weight (`float`, *optional*):
            lambda, the weight of the preserved-key second moment (MEMIT Eq. 14). `None` takes the per-model
            default (see [`~memit_hf.defaults.resolve_arguments`]). Must be positive: with 0 the system of a batch
            smaller than the key width is singular.
    """

    mom2_update_weight: float | None = field(
        default=None, metadata={"help": "lambda: weight of the preserved-key second moment (default per model)."}
    )

    def __post_init__(self):
        if self.mom2_update_weight is not None and not self.mom2_update_weight > 0:
            raise ValueError(f"`mom2_update_weight` must be positive, got {self.mom2_update_weight}.")


def update_norm_field() -> Any:
    """The `update_norm_weight` field of the sequential methods (memit_seq, EMMET): mu, a Frobenius-norm penalty on
    each update (`mu ||Delta||_F^2`, so `mu I` joins the preserved term), the norm constraint of ENCORE
    (https://huggingface.co/papers/2502.01636, mu = 20 on Llama-3-8B) and EMMET's `update_norm_lambda`. Absolute, on
    the scale of `lambda C0`; 0 (the default) is the published method."""
    return field(
        default=0.0, metadata={"help": "mu: Frobenius-norm penalty on each update (ENCORE's norm constraint)."}
    )


def check_update_norm_weight(value: float) -> None:
    """Refuse a negative `update_norm_weight`.

    Raises:
        ValueError: naming the field.
    """
    if not value >= 0:
        raise ValueError(f"`update_norm_weight` must be non-negative, got {value}.")
