"""The interface every editing algorithm implements, and the numerically careful factorisation they share."""

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..statistics import LayerStatistics
from .config import AlgorithmConfig


class IllConditionedError(ValueError):
    """Raised when a system that must be positive definite is not (numerically)."""


def cholesky_factor(matrix: torch.Tensor, what: str) -> torch.Tensor:
    """Lower Cholesky factor of a symmetric positive definite float64 matrix.

    Raises:
        IllConditionedError: if the matrix has non-finite entries or is not numerically positive definite.
    """
    if not torch.isfinite(matrix).all():
        raise IllConditionedError(f"{what} has non-finite entries; the statistics or keys are corrupted.")
    factor, info = torch.linalg.cholesky_ex(matrix)
    # A pivot at roundoff level (squared pivot / largest diagonal entry below 1e-12) means numerically singular,
    # even when the factorisation itself does not fail.
    scale = matrix.diagonal().abs().max().clamp_min(torch.finfo(matrix.dtype).tiny)
    if int(info) != 0 or bool((factor.diagonal() ** 2 / scale).min() < 1e-12):
        raise IllConditionedError(
            f"{what} is not numerically positive definite: the system is ill-conditioned (duplicate requests or "
            "keys?). Collect statistics over more tokens (`stats_num_tokens`) or raise `mom2_update_weight`."
        )
    return factor


def preserved_term(statistics: LayerStatistics, weight: float, norm_weight: float = 0.0) -> torch.Tensor:
    """`weight * C0 (+ norm_weight * I)` of one layer's statistics, float64 `(d_in, d_in)`, from the sum (one
    division by the count).

    Args:
        statistics ([`~memit_hf.statistics.LayerStatistics`]): the preserved keys' second moment.
        weight (`float`): lambda.
        norm_weight (`float`, *optional*, defaults to `0.0`): mu, the Frobenius-norm penalty on the update.
    """
    term = statistics.moment.total * (weight / statistics.moment.count)
    if norm_weight:
        term = term + norm_weight * torch.eye(len(term), dtype=term.dtype, device=term.device)
    return term


def check_preserved_term(statistics: LayerStatistics, weight: float) -> None:
    """Fail before any weight changes when `weight * C0` cannot be factorised.

    Raises:
        IllConditionedError: naming the module.
    """
    cholesky_factor(weight * statistics.covariance(), f"lambda * C of `{statistics.module_name}`")


def equality_constrained_update(
    keys: torch.Tensor, residuals: torch.Tensor, factor: torch.Tensor, ridge: float = 0.0, relative: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The minimum-disturbance update that writes the residuals: `Delta = R (K^T C^-1 K + rho I)^-1 K^T C^-1` with
    `rho = ridge * mean(diag(K^T C^-1 K))` (or `rho = ridge` when not `relative`). With `ridge = 0` every residual is
    written exactly (ROME's form, the minimum `C`-norm solution of `Delta K = R`); a positive ridge relaxes the
    constraints (EMMET).

    Args:
        keys (`torch.Tensor`): `(n, d_in)` float64 keys.
        residuals (`torch.Tensor`): `(n, d_out)` float64 residuals.
        factor (`torch.Tensor`): the lower Cholesky factor of `C`, `(d_in, d_in)`.
        ridge (`float`, *optional*, defaults to `0.0`): `rho`, relative to the mean diagonal of `K^T C^-1 K`.
        relative (`bool`, *optional*, defaults to `True`): `False` takes `ridge` as the absolute `rho`.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: `B = R (K^T C^-1 K + rho I)^-1` `(d_out, n)` and `A = (C^-1 K)^T`
        `(n, d_in)`, so the update stays rank <= n.

    Raises:
        IllConditionedError: if `K^T C^-1 K (+ rho I)` is not numerically positive definite.
    """
    c_inv_k = torch.cholesky_solve(keys.T, factor)  # (d_in, n)
    gram = keys @ c_inv_k  # (n, n) = K^T C^-1 K
    if ridge:
        rho = ridge * gram.diagonal().mean() if relative else ridge
        gram = gram + rho * torch.eye(len(keys), dtype=gram.dtype, device=gram.device)
        what = "K^T C^-1 K + rho I (are two requests' keys identical?)"
    else:
        what = "K^T C^-1 K (are two requests' keys identical?)"
    coefficients = torch.cholesky_solve(residuals, cholesky_factor(gram, what))  # (n, d_out)
    return coefficients.T.contiguous(), c_inv_k.T.contiguous()


@dataclass
class LayerProblem:
    """What one layer's solve gets.

    Args:
        module_name (`str`): the edited module.
        layer (`int`): its decoder layer.
        keys (`torch.Tensor`): `(n, d_in)` float64 keys K^T of the requests at this layer.
        residuals (`torch.Tensor`): `(n, d_out)` float64 residuals R^T this layer must write.
        statistics ([`~memit_hf.statistics.LayerStatistics`]): the preserved keys' second moment.
    """

    module_name: str
    layer: int
    keys: torch.Tensor
    residuals: torch.Tensor
    statistics: LayerStatistics


class EditAlgorithm(ABC):
    """An editing method: solves each layer's update from keys, residuals and the preserved-key statistics.

    The Editor calls, per `edit()`: [`prepare`] for every edited layer before any weight changes (validation and
    derived quantities, cached per statistics fingerprint), [`solve`] layer by layer, then [`commit`] when the whole
    edit succeeded or [`discard`] when it failed. Updates are thin factors `(B, A)` with `Delta = B @ A`, `B` of shape
    `(d_out, n)` and `A` of shape `(n, d_in)`, so every update is exactly rank <= n and exports to a LoRA adapter
    without loss.

    Per-layer state (for sequential methods) is written with [`stage`] during `solve`, becomes visible through
    [`layer_state`] only after [`commit`], and round-trips through [`state_dict`] / [`load_state_dict`].

    Subclasses set `config_class` and implement [`solve`] (and [`derive`] when they cache something).
    """

    config_class: ClassVar[type[AlgorithmConfig]]

    def __init__(self, config: AlgorithmConfig | None = None):
        self.config = config if config is not None else self.config_class()
        self._prepared: dict[str, tuple[str, Any]] = {}
        self._state: dict[str, dict[str, torch.Tensor]] = {}
        self._pending: dict[str, dict[str, torch.Tensor]] = {}
        self._pending_grams: list[tuple[str, str, torch.Tensor]] = []

    @property
    def name(self) -> str:
        return self.config.name

    # ---------------------------------------------------------------------------------------------- preparation
    def derive(self, statistics: LayerStatistics) -> Any:
        """Quantities derived from one layer's statistics (a factorisation, a projector), computed once per
        fingerprint. Raise [`IllConditionedError`] when the statistics cannot support a solve."""
        return None

    def prepare(self, statistics: LayerStatistics) -> None:
        """Validate and cache what [`derive`] returns for `statistics`, unless it is cached for the same
        fingerprint already."""
        cached = self._prepared.get(statistics.module_name)
        if cached is None or cached[0] != statistics.key:
            self._prepared[statistics.module_name] = (statistics.key, self.derive(statistics))

    def prepared(self, module_name: str) -> Any:
        """What [`prepare`] cached for `module_name`."""
        return self._prepared[module_name][1]

    def prepared_for(self, statistics: LayerStatistics) -> Any:
        """What [`prepare`] cached for `statistics` (its module and fingerprint), or None when it was not prepared."""
        cached = self._prepared.get(statistics.module_name)
        return cached[1] if cached is not None and cached[0] == statistics.key else None

    # ---------------------------------------------------------------------------------------------------- solve
    @abstractmethod
    def solve(self, problem: LayerProblem) -> tuple[torch.Tensor, torch.Tensor]:
        """The update of one layer.

        Returns:
            `tuple[torch.Tensor, torch.Tensor]`: `B (d_out, n)` and `A (n, d_in)`, float64.
        """

    # ---------------------------------------------------------------------------------------------------- state
    def stage(self, module_name: str, **tensors: torch.Tensor) -> None:
        """Record new state of `module_name`, applied by [`commit`] (dropped by [`discard`])."""
        self._pending.setdefault(module_name, {}).update(tensors)

    def layer_state(self, module_name: str) -> dict[str, torch.Tensor]:
        """The committed state of `module_name` (empty for stateless methods)."""
        return self._state.get(module_name, {})

    def accumulate_gram(self, module_name: str, key: str, factor: torch.Tensor) -> None:
        """Stage `state[module_name][key] += factor^T @ factor` (float64; `factor` is `(n, d)`): the constant-memory
        state of sequential methods (the Gram matrix of every earlier batch's keys). Applied by [`commit`]; the
        factors of a committed edit are what [`pending_increments`] returned, so [`replay`] rebuilds the state."""
        self._pending_grams.append((module_name, key, factor.detach().double().cpu()))

    def pending_increments(self) -> list[tuple[str, str, torch.Tensor]]:
        """The Gram factors staged by the current edit (to record with it, for [`replay`])."""
        return list(self._pending_grams)

    def _apply_gram(self, module_name: str, key: str, factor: torch.Tensor) -> None:
        layer = self._state.setdefault(module_name, {})
        product = factor.T @ factor
        layer[key] = layer[key] + product if key in layer else product

    def commit(self) -> None:
        """Make the state staged during the last edit permanent."""
        for module_name, tensors in self._pending.items():
            self._state.setdefault(module_name, {}).update(tensors)
        for module_name, key, factor in self._pending_grams:
            self._apply_gram(module_name, key, factor)
        self._pending, self._pending_grams = {}, []

    def discard(self) -> None:
        """Drop the state staged during a failed edit."""
        self._pending, self._pending_grams = {}, []

    def replay(
        self, increments: list[list[tuple[str, str, torch.Tensor]]], base: dict[str, torch.Tensor] | None = None
    ) -> None:
        """Rebuild the accumulated state from the Gram factors of the edits to keep, in order: the same operations in
        the same order as their commits, so the state is bit-identical to what it was after them.

        Args:
            increments (`list[list[tuple[str, str, torch.Tensor]]]`): per edit, its Gram factors.
            base (`dict[str, torch.Tensor]`, *optional*): the state ([`state_dict`] form) the edits were made on (a
                consolidated history's floor); empty when `None`.
        """
        self.load_state_dict({name: tensor.clone() for name, tensor in (base or {}).items()})
        for edit in increments:
            for module_name, key, factor in edit:
                self._apply_gram(module_name, key, factor)

    def diagnostics(self) -> dict[str, float]:
        """Figures of the last edit worth reporting in `EditOutput.metrics` (e.g. a kept null-space rank)."""
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The committed state as flat tensors named `"<module>::<key>"` (safetensors-compatible)."""
        return {f"{module}::{key}": t for module, tensors in self._state.items() for key, t in tensors.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the committed state with `state` (from [`state_dict`]).

        Raises:
            ValueError: for a name that is not `"<module>::<key>"`.
        """
        loaded: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in state.items():
            module, sep, key = name.rpartition("::")
            if not sep or not module or not key:
                raise ValueError(f"State entry `{name}` is not named `<module>::<key>`.")
            loaded.setdefault(module, {})[key] = tensor
        self._state = loaded
        self._pending, self._pending_grams = {}, []
