"""Temporary run modes of a model: evaluation mode (dropout off) and frozen parameters, each restored on exit."""

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put `model` in evaluation mode (dropout off, as the statistics and the edit assume) and restore every
    submodule's own `training` flag afterwards, so a model in training mode comes back in training mode."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training


@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily set `requires_grad=False` on every parameter, so backward passes compute only the gradient of
    the delta (no weight gradients, no saved activations for them)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
