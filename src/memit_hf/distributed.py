"""The process state shared with accelerate, detected correctly on CPU-only machines too."""

import os

import torch
from accelerate import PartialState


def process_state() -> PartialState:
    """accelerate's `PartialState`, created with `cpu=True` when there is no CUDA device (or `ACCELERATE_USE_CPU` is
    set): `PartialState()` alone reports a single process under `torchrun` or `debug_launcher` on a CPU-only machine,
    so statistics and requests would silently not be split. When an `Accelerator` or `PartialState` already exists, its
    state is returned unchanged.
    """
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()
    return PartialState(cpu=use_cpu)
