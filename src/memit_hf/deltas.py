"""Weight updates as exact low-rank factors, applied to and removed from a model bit-exactly."""

from dataclasses import dataclass

import torch
from torch import nn

from .architectures import is_transposed


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
def add_delta(model: nn.Module, delta: LayerDelta) -> None:
    """`W += Delta` in place, computed in float32 and cast to the weight's dtype and device."""
    weight = model.get_submodule(delta.module_name).weight
    weight.copy_((weight.float() + delta.dense().to(weight.device)).to(weight.dtype))


class WeightSnapshot:
    """Bit-exact copies of some modules' weights, restorable at any time."""

    def __init__(self, model: nn.Module, module_names: list[str]):
        self.model = model
        self.saved = {name: model.get_submodule(name).weight.detach().clone() for name in module_names}

    @torch.no_grad()
    def restore(self) -> None:
        for name, original in self.saved.items():
            self.model.get_submodule(name).weight.copy_(original)

    def __contains__(self, name: str) -> bool:
        return name in self.saved
