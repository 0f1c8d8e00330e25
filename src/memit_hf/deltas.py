"""Weight updates as exact low-rank factors, applied to and removed from a model bit-exactly."""

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .architectures import is_transposed
from .tracing import LowRankAdditions
from .weights import read_parameter, write_parameter


@dataclass
class LayerDelta:
    """The update of one module: `Delta = lora_B @ lora_A` in `(out, in)` convention.

    Args:
        module_name (`str`): the edited module, e.g. `"model.layers.4.mlp.down_proj"`.
        lora_B (`torch.Tensor`): `(d_out, n)` float32 (the residuals).
        lora_A (`torch.Tensor`): `(n, d_in)` float32 (the adjusted keys).
        fan_in_fan_out (`bool`): whether the module stores its weight as `(in, out)` (GPT-2 `Conv1D`).
    """

    module_name: str
    lora_B: torch.Tensor
    lora_A: torch.Tensor
    fan_in_fan_out: bool = False

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def dense(self) -> torch.Tensor:
        """The update shaped like the module's weight (transposed for `fan_in_fan_out`), float32."""
        delta = self.lora_B.float() @ self.lora_A.float()
        return delta.T if self.fan_in_fan_out else delta


def make_delta(module_name: str, module: nn.Module, lora_B: torch.Tensor, lora_A: torch.Tensor) -> LayerDelta:
    """Build a [`LayerDelta`] for `module`, checking the factor shapes against its weight.

    Raises:
        ValueError: if the factors do not match the weight's shape.
    """
    transposed = is_transposed(module)
    d_out, d_in = module.weight.shape[::-1] if transposed else module.weight.shape
    if lora_B.shape[0] != d_out or lora_A.shape[1] != d_in or lora_B.shape[1] != lora_A.shape[0]:
        raise ValueError(
            f"Update factors {tuple(lora_B.shape)} x {tuple(lora_A.shape)} do not fit `{module_name}` "
            f"(out={d_out}, in={d_in})."
        )
    return LayerDelta(module_name, lora_B.float().contiguous(), lora_A.float().contiguous(), transposed)


@torch.no_grad()
def merged_weight(weight: torch.Tensor, delta: LayerDelta, dense: torch.Tensor | None = None) -> torch.Tensor:
    """`W + Delta` as [`add_delta`] computes it (in float32, cast to the weight's dtype): bit-identical to merging
    `delta` into a module whose weight is `weight`.

    Args:
        weight (`torch.Tensor`): the weight before the update.
        delta ([`LayerDelta`]): the update.
        dense (`torch.Tensor`, *optional*): `delta.dense()` on the weight's device, when already computed.

    Returns:
        `torch.Tensor`: the merged weight, in `weight`'s dtype and on its device.
    """
    dense = delta.dense().to(weight.device) if dense is None else dense
    return (weight.float() + dense).to(weight.dtype)


@torch.no_grad()
def add_delta(model: nn.Module, delta: LayerDelta) -> float:
    """`W += Delta` in place, computed in float32 and cast to the weight's dtype and device (offloaded weights
    included, see [`~memit_hf.weights.write_parameter`]).

    Returns:
        `float`: the rounding error of the merge, `||W_new - (W + Delta)|| / ||Delta||` (Frobenius, float64): what
        storing the sum in the weight's dtype lost of the update (about 1e-7 in float32; in bfloat16 much of a small
        update can be rounded away).
    """
    module = model.get_submodule(delta.module_name)
    weight = read_parameter(module)
    dense = delta.dense().to(weight.device)
    merged = merged_weight(weight, delta, dense)
    lost, size = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    for rows in torch.arange(weight.shape[0]).split(1024):  # float64 in row blocks: bounded memory
        exact = weight[rows].double() + dense[rows].double()
        lost += (merged[rows].double() - exact).pow(2).sum().cpu()
        size += dense[rows].double().pow(2).sum().cpu()
    write_parameter(module, merged)
    return float(lost.sqrt() / size.sqrt().clamp_min(torch.finfo(torch.float64).tiny))


class WeightSnapshot:
    """Bit-exact copies of some modules' weights (wherever they live), restorable at any time."""

    def __init__(self, model: nn.Module, module_names: list[str]):
        self.model = model
        self.saved = {name: read_parameter(model.get_submodule(name)).detach().clone() for name in module_names}

    @torch.no_grad()
    def restore(self) -> None:
        for name, original in self.saved.items():
            write_parameter(self.model.get_submodule(name), original)

    def __contains__(self, name: str) -> bool:
        return name in self.saved


class AppliedEdits:
    """The updates a model holds, applied in one of two ways:

    - merged (`merge=True`): added to the weights in place ([`add_delta`]); the original weights are kept to restore
      them bit for bit;
    - as hooks (`merge=False`): the weights stay untouched and each edited module adds its exact low-rank update to
      its output in float32 ([`~memit_hf.tracing.LowRankAdditions`]), like an un-merged LoRA adapter: nothing is
      rounded to a half-precision weight dtype.

    Args:
        model (`nn.Module`): the edited model.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.pristine: dict[str, torch.Tensor] = {}
        """The original weight of every module merged into, by name."""
        self.additions = LowRankAdditions(model)

    def apply(self, delta: LayerDelta, merge: bool = True) -> float:
        """Apply `delta`; returns the merge's rounding error (see [`add_delta`]; 0 for hooks)."""
        if not merge:
            self.additions.add(delta.module_name, delta.lora_B, delta.lora_A)
            return 0.0
        if delta.module_name not in self.pristine:
            self.pristine[delta.module_name] = read_parameter(self.model.get_submodule(delta.module_name)).clone()
        return add_delta(self.model, delta)

    def checkpoint(self) -> tuple:
        """What [`revert`] needs to undo the applications that follow (an edit that fails half-way)."""
        return WeightSnapshot(self.model, list(self.pristine)), dict(self.pristine), dict(self.additions.factors)

    @torch.no_grad()
    def revert(self, checkpoint: tuple) -> None:
        """Undo every application since `checkpoint`, bit for bit."""
        snapshot, pristine, factors = checkpoint
        for name in set(self.pristine) - set(pristine):  # merged into for the first time since the checkpoint
            write_parameter(self.model.get_submodule(name), self.pristine[name])
        snapshot.restore()
        self.pristine = pristine
        self.additions.clear()
        for name, (lora_B, lora_A) in factors.items():
            self.additions.add(name, lora_B, lora_A)

    @torch.no_grad()
    def reset(self) -> None:
        """Back to the original model, bit for bit: the original weights written back, every hook removed."""
        for name, original in self.pristine.items():
            write_parameter(self.model.get_submodule(name), original)
        self.pristine.clear()
        self.additions.clear()

    @torch.no_grad()
    def replay(
        self, deltas: list[LayerDelta], merge: bool = True, base_weights: dict[str, torch.Tensor] | None = None
    ) -> None:
        """Back to the original model, then apply `deltas` in order: bit-identical to applying them the first time.

        Args:
            deltas (`list[LayerDelta]`): the updates to apply, in order.
            merge (`bool`, *optional*, defaults to `True`): merge them (else add them as hooks).
            base_weights (`dict[str, torch.Tensor]`, *optional*): weights written into these modules before the
                updates (a consolidated history's floor); the original weights are still what [`reset`] restores.
        """
        pristine = dict(self.pristine)
        self.reset()
        for name, weight in (base_weights or {}).items():
            module = self.model.get_submodule(name)
            if name not in self.pristine:
                self.pristine[name] = read_parameter(module).clone()
            write_parameter(module, weight)
        for delta in deltas:
            self.apply(delta, merge)
        self.pristine.update({name: weight for name, weight in pristine.items() if name not in self.pristine})

    @contextlib.contextmanager
    def unedited(self) -> Iterator[nn.Module]:
        """Within the context the model computes as the original: original weights swapped in, hooks off."""
        current = WeightSnapshot(self.model, list(self.pristine))
        with torch.no_grad():
            for name, original in self.pristine.items():
                write_parameter(self.model.get_submodule(name), original)
        try:
            with self.additions.disabled():
                yield self.model
        finally:
            current.restore()

    @contextlib.contextmanager
    def merged(self) -> Iterator[nn.Module]:
        """Within the context the hooked updates are merged into the weights (to save a full checkpoint); outside it
        the weights are exactly what they were."""
        names = list(self.additions.factors)
        current = WeightSnapshot(self.model, names)
        try:
            with self.additions.disabled():
                for name, (lora_B, lora_A) in self.additions.factors.items():
                    module = self.model.get_submodule(name)
                    add_delta(self.model, LayerDelta(name, lora_B.cpu(), lora_A.cpu(), is_transposed(module)))
                yield self.model
        finally:
            current.restore()
