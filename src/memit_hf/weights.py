"""A module's parameter values wherever they live: on the module, or offloaded by accelerate (`device_map` with
`"cpu"` / `"disk"` entries, `cpu_offload`, `disk_offload`), where the module holds a meta tensor and its hook a map
of the real values.

Writing an offloaded parameter never touches the files it was loaded from: a parameter offloaded to the CPU is
updated in place, one offloaded to disk gets its new value held in the offload map's memory (which takes precedence
over the disk), so the checkpoint on disk stays the original.
"""

import torch
from torch import nn


def offload_map(module: nn.Module):
    """The map of a module's offloaded parameter values (accelerate's `weights_map`), or `None` when the module holds
    its own values."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None or not getattr(hook, "offload", False):
        return None
    return getattr(hook, "weights_map", None)


def read_parameter(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The values of `module.<name>`: the parameter itself, or its offloaded value (on the offload device).

    Args:
        module (`nn.Module`): the module.
        name (`str`, *optional*, defaults to `"weight"`): the parameter's name in the module.

    Returns:
        `torch.Tensor`: the values (not a copy: clone it to keep them).
    """
    parameter = getattr(module, name)
    mapping = offload_map(module)
    if mapping is None or parameter.device.type != "meta":
        return parameter
    return mapping[name]


@torch.no_grad()
def write_parameter(module: nn.Module, value: torch.Tensor, name: str = "weight") -> None:
    """Set the values of `module.<name>` to `value` (cast to the parameter's dtype), in place.

    Args:
        module (`nn.Module`): the module.
        value (`torch.Tensor`): the new values, shaped like the parameter.
        name (`str`, *optional*, defaults to `"weight"`): the parameter's name in the module.
    """
    parameter = getattr(module, name)
    mapping = offload_map(module)
    if mapping is None or parameter.device.type != "meta":
        parameter.copy_(value)
        return
    loader, key = getattr(mapping, "dataset", mapping), getattr(mapping, "prefix", "") + name
    held = getattr(loader, "state_dict", None)
    if not isinstance(held, dict):
        raise TypeError(f"Cannot write the offloaded parameter `{key}`: its offload map is a `{type(loader)}`.")
    if key in held and held[key].shape == value.shape:
        held[key].copy_(value)  # offloaded to the CPU (or written here before): in place
    else:
        current = mapping[name]
        held[key] = value.to(device=current.device, dtype=current.dtype).clone()  # on disk: held in memory from now on
