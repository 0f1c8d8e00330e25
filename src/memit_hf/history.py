"""The edit history of a model: every batch it holds, how their updates are applied, and the method's accumulated
state, with the operations that change them together (apply as one transaction, roll back, reset, replay,
consolidate)."""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .algorithms import EditAlgorithm, get_algorithm
from .deltas import AppliedEdits, LayerDelta, merged_weight
from .export import ExportReport, edit_metadata, prepare_deltas, write_edit_adapter
from .requests import EditRequest
from .statistics import LayerStatistics
from .values import ValueResult


class StateMismatchError(ValueError):
    """Raised when a saved editor state does not belong to the model, statistics or arguments at hand, or is
    malformed, or when edits would continue a method's state with other statistics than it was made with."""


GramIncrements = list[tuple[str, str, torch.Tensor]]
"""The Gram factors one edit added to the method's state: `(module, key, factor)` (see
[`~memit_hf.algorithms.EditAlgorithm.replay`])."""


@dataclass
class BatchRecord:
    """What one `edit()` call records: its entry in exported metadata (`memit_edits.json`), model cards and saved
    states.

    Args:
        algorithm (`str`): the method.
        layers (`list[int]`): the edited layers.
        num_requests (`int`): how many requests it applied.
        hyperparameters (`dict`): the other editing arguments (`EditingArguments.editing_values()` without
            `algorithm` and `layers`, which are the fields above).
        statistics (`dict[str, dict]`): per edited module, what identifies its statistics
            ([`~memit_hf.statistics.LayerStatistics.info`]).
        requests (`list[dict]`): the requests (`prompt`, `subject`, `target_new`, `target_true`, `case_id`).
        metrics (`dict[str, float]`): the edit's metrics (and any evaluation a caller adds).
        extra (`dict`): further entries written beside these (e.g. the CLI's `source`: the files it read).
    """

    algorithm: str
    layers: list[int]
    num_requests: int
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    statistics: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[dict[str, Any]] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The metadata entry (the JSON form)."""
        values = {
            "algorithm": self.algorithm,
            "layers": list(self.layers),
            "num_requests": self.num_requests,
            "hyperparameters": dict(self.hyperparameters),
            "statistics": {name: dict(info) for name, info in self.statistics.items()},
            "requests": self.requests,
            "metrics": dict(self.metrics),
        }
        return {**values, **self.extra}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "BatchRecord":
        """Read a metadata entry (as [`to_dict`] writes it; unknown entries go to `extra`).

        Raises:
            ValueError: when it is not a mapping or a field has the wrong type (naming the field).
        """
        if not isinstance(values, dict):
            raise ValueError(f"A batch record must be a mapping, got {type(values).__name__}.")
        kinds = {
            "algorithm": str,
            "layers": list,
            "num_requests": int,
            "hyperparameters": dict,
            "statistics": dict,
            "metrics": dict,
        }
        for name, kind in kinds.items():
            if name in values and not isinstance(values[name], kind):
                raise ValueError(f"Field `{name}` of a batch record must be a `{kind.__name__}`.")
        if values.get("requests") is not None and not isinstance(values["requests"], list):
            raise ValueError("Field `requests` of a batch record must be a list.")
        hyperparameters = dict(values.get("hyperparameters") or {})
        layers = values.get("layers", hyperparameters.get("layers"))
        if not isinstance(layers, list) or not all(isinstance(layer, int) for layer in layers):
            raise ValueError("Field `layers` of a batch record must be a list of layer indices.")
        for name in ("algorithm", "layers"):  # written there by memit-hf before 0.x; one copy now
            hyperparameters.pop(name, None)
        requests = values.get("requests")
        return cls(
            algorithm=str(values.get("algorithm", "")),
            layers=list(layers),
            num_requests=int(values.get("num_requests", len(requests or []))),
            hyperparameters=hyperparameters,
            statistics=dict(values.get("statistics") or {}),
            requests=requests,
            metrics=dict(values.get("metrics") or {}),
            extra={key: value for key, value in values.items() if key not in {*kinds, "requests"}},
        )


@dataclass
class EditOutput:
    """What [`~memit_hf.Editor.edit`] returns, and one batch of an [`EditHistory`].

    Args:
        deltas (`list[LayerDelta]`): the update of every edited module, as exact low-rank factors.
        metrics (`dict[str, float]`): timings per stage (`*_seconds`), z losses, counts and the residual diagnostic
            `residual_achieved` (fraction of the target residual at the last edited layer the update delivers).
        requests (`list[EditRequest]`): the normalised requests.
        values (`ValueResult`): per-request z optimisation results.
        record ([`BatchRecord`]): what exported adapters and saved states record about this edit.
        model_info (`dict`): the base model's identity (see [`~memit_hf.Editor.edit_metadata`]).
        state_increments (`list`): the Gram factors this edit added to the method's state.
    """

    deltas: list[LayerDelta]
    metrics: dict[str, float]
    requests: list[EditRequest]
    values: ValueResult | None = field(default=None, repr=False)
    record: BatchRecord | None = field(default=None, repr=False)
    model_info: dict[str, Any] = field(default_factory=dict, repr=False)
    state_increments: GramIncrements = field(default_factory=list, repr=False)

    @property
    def metadata(self) -> dict[str, Any]:
        """`{"model": model_info, "batch": record.to_dict()}` (a copy: change `record` to change what is written)."""
        return {"model": dict(self.model_info), "batch": self.record.to_dict() if self.record else {}}

    def save_adapter(
        self,
        path: str | Path,
        export_rank: int | float | None = None,
        base_model_name_or_path: str | None = None,
        include_requests: bool = True,
    ) -> ExportReport:
        """Write this edit alone as a peft LoRA adapter (see [`~memit_hf.Editor.save_adapter`] for the arguments)."""
        metadata = edit_metadata(self.model_info, [self.record.to_dict()], include_requests, base_model_name_or_path)
        return write_edit_adapter(self.deltas, path, metadata, export_rank)


@dataclass
class HistoryFloor:
    """The batches of a sequence that `keep_history` consolidated: what rollback cannot go below.

    Args:
        weights (`dict[str, torch.Tensor]`): the edited modules' weights after these batches, bit for bit (the kept
            batches are applied on them).
        algorithm_state (`dict[str, torch.Tensor]`): the method's committed state after them.
        deltas (`list[LayerDelta]`): their updates summed exactly, one per module (what exported adapters hold).
        batches (`list[BatchRecord]`): their records, in order (requests included).
    """

    weights: dict[str, torch.Tensor]
    algorithm_state: dict[str, torch.Tensor]
    deltas: list[LayerDelta]
    batches: list[BatchRecord]

    @property
    def num_edits(self) -> int:
        return sum(batch.num_requests for batch in self.batches)


class EditHistory:
    """Everything a model holds from its edits, changed only together: the batches (one [`EditOutput`] each, in
    order), how their updates are applied ([`~memit_hf.deltas.AppliedEdits`]: merged or as hooks, with the original
    weights), the batches consolidated by `keep_history` ([`HistoryFloor`]) and the method whose state the batches
    accumulated.

    Args:
        model (`nn.Module`): the edited model.
    """

    def __init__(self, model: nn.Module):
        self.applied = AppliedEdits(model)
        self.batches: list[EditOutput] = []
        self.merged: bool | None = None
        """How the held updates are applied (`merge_edits` of the first edit); `None` when nothing is held."""
        self.floor: HistoryFloor | None = None
        self.algorithm: EditAlgorithm | None = None
        """The method holding state from these batches (`None` until the first edit)."""

    # -------------------------------------------------------------------------------------------------- queries
    def records(self) -> list[BatchRecord]:
        """The record of every batch the model holds, consolidated ones first."""
        return [*(self.floor.batches if self.floor else []), *(batch.record for batch in self.batches)]

    def held_deltas(self) -> list[LayerDelta]:
        """Every update the model holds, in order (the consolidated ones summed per module first)."""
        return [*(self.floor.deltas if self.floor else []), *(d for batch in self.batches for d in batch.deltas)]

    @property
    def num_edits(self) -> int:
        return sum(record.num_requests for record in self.records())

    def __len__(self) -> int:
        return len(self.batches)

    def check_merge_mode(self, merge: bool) -> None:
        """Refuse to apply an edit otherwise than the edits held.

        Raises:
            ValueError: when `merge` differs from how the held edits are applied.
        """
        if self.merged is not None and self.merged != merge:
            raise ValueError(
                f"The edits held are applied with `merge_edits={self.merged}` but `args` now say "
                f"`merge_edits={merge}`; call `restore()` first."
            )

    def method(self, name: str, config: dict[str, Any]) -> EditAlgorithm:
        """The method `name` with `config`: the one holding state, or a new one when none does.

        Raises:
            ValueError: when another method or configuration holds state from the batches (`restore()` first).
        """
        current = self.algorithm
        if current is None or current.name != name or current.config.to_dict() != config:
            if current is not None and current.state_dict():
                raise ValueError(
                    f"`args` changed the method from `{current.name}` {current.config.to_dict()} while it holds "
                    "state from earlier edits; call `restore()` first."
                )
            self.algorithm = get_algorithm(name, config)
        return self.algorithm

    def check_statistics(self, algorithm: EditAlgorithm, statistics: dict[str, LayerStatistics]) -> None:
        """A method that holds state from earlier edits continues only with the statistics those edits used.

        Raises:
            StateMismatchError: naming the module and both fingerprint keys.
        """
        records = self.records()
        if not (algorithm.state_dict() and records):
            return
        used = records[-1].statistics
        for name, layer_statistics in statistics.items():
            if name in used and used[name]["key"] != layer_statistics.key:
                raise StateMismatchError(
                    f"`{algorithm.name}` holds state accumulated with the statistics {used[name]['key']} of `{name}`, "
                    f"but they are now {layer_statistics.key} (another corpus or `stats_*` arguments): call "
                    "`restore()` first, or keep the statistics of the earlier edits."
                )

    # ---------------------------------------------------------------------------------------------- one edit
    @contextmanager
    def transaction(self, algorithm: EditAlgorithm) -> Iterator[None]:
        """The updates applied inside (with [`apply`]) and the state `algorithm` stages stay only if the block
        succeeds; on any exception the weights are restored bit for bit and the staged state dropped."""
        checkpoint = self.applied.checkpoint()
        try:
            yield
        except BaseException:
            self.applied.revert(checkpoint)
            algorithm.discard()
            raise
        algorithm.commit()

    def apply(self, delta: LayerDelta, merge: bool) -> float:
        """Apply one update (inside a [`transaction`]); returns the merge's rounding error."""
        return self.applied.apply(delta, merge)

    def append(self, output: EditOutput, merge: bool, keep: int | None = None) -> None:
        """Record a successful edit, then consolidate all but the latest `keep` batches (`None`: keep all)."""
        self.batches.append(output)
        self.merged = merge
        if keep is not None:
            self.consolidate(len(self.batches) - keep)

    # ------------------------------------------------------------------------------------------------ changes
    @torch.no_grad()
    def reset(self) -> None:
        """Back to the original weights, bit for bit; every batch, the floor and the method's state forgotten."""
        self.applied.reset()
        self.batches.clear()
        self.merged = None
        self.floor = None
        self.algorithm = None

    @torch.no_grad()
    def rollback(self, k: int) -> None:
        """Undo the last `k` batches: the weights bit-identical to what they were before them, the method's state
        rebuilt from the kept batches' Gram factors.

        Raises:
            ValueError: if `k` is not between 1 and the number of batches held (not consolidated).
        """
        if not 1 <= k <= len(self.batches):
            floor = f" ({len(self.floor.batches)} more are consolidated by `keep_history`)" if self.floor else ""
            raise ValueError(
                f"`k` must be between 1 and the number of edits held ({len(self.batches)}){floor}, got {k}."
            )
        kept = self.batches[: len(self.batches) - k]
        floor = self.floor
        deltas = [delta for batch in kept for delta in batch.deltas]
        self.applied.replay(deltas, self.merged is not False, floor.weights if floor else None)
        if self.algorithm is not None:
            self.algorithm.replay([batch.state_increments for batch in kept], floor.algorithm_state if floor else None)
        self.batches = kept

    @torch.no_grad()
    def load(
        self,
        batches: list[EditOutput],
        merge: bool,
        floor: HistoryFloor | None,
        algorithm: EditAlgorithm,
        algorithm_state: dict[str, torch.Tensor],
    ) -> None:
        """Hold `batches` (a saved sequence) on the original model: their updates applied in order on the floor's
        weights, `algorithm` given the saved state. All or nothing: on failure the weights are as before.
        """
        checkpoint = self.applied.checkpoint()
        try:
            deltas = [delta for batch in batches for delta in batch.deltas]
            self.applied.replay(deltas, merge, floor.weights if floor else None)
            if algorithm_state:
                algorithm.load_state_dict(algorithm_state)
        except BaseException:
            self.applied.revert(checkpoint)
            raise
        self.batches, self.merged, self.floor, self.algorithm = list(batches), merge, floor, algorithm

    @torch.no_grad()
    def consolidate(self, num_batches: int) -> None:
        """Fold the oldest `num_batches` batches into the floor (see `keep_history`): the edited weights and the
        method's state after them are kept bit for bit, their updates summed into one per module."""
        if num_batches <= 0:
            return
        old, self.batches = self.batches[:num_batches], self.batches[num_batches:]
        floor = self.floor
        weights = dict(floor.weights) if floor else {}
        for batch in old:
            for delta in batch.deltas:
                base = weights.get(delta.module_name)
                if base is None:
                    base = self.applied.pristine[delta.module_name]
                weights[delta.module_name] = merged_weight(base, delta)
        algorithm_state = {}
        if self.algorithm is not None and self.algorithm.state_dict():
            current = {name: tensor.clone() for name, tensor in self.algorithm.state_dict().items()}
            self.algorithm.replay([batch.state_increments for batch in old], floor.algorithm_state if floor else None)
            algorithm_state = {name: tensor.clone() for name, tensor in self.algorithm.state_dict().items()}
            self.algorithm.load_state_dict(current)
        deltas, _ = prepare_deltas([*(floor.deltas if floor else []), *(d for batch in old for d in batch.deltas)])
        records = [*(floor.batches if floor else []), *(batch.record for batch in old)]
        self.floor = HistoryFloor(weights, algorithm_state, deltas, records)
