"""The process state shared with accelerate, detected correctly on CPU-only machines too."""

import os
from collections.abc import Callable
from typing import Any

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


def owned_chunks(num_chunks: int, state: PartialState | None = None) -> list[int]:
    """The chunk indices this process works on: chunks are dealt round-robin (`rank, rank + world, ...`), whole and
    unpadded, so every chunk is computed exactly as a single process computes it, for any number of processes."""
    state = state or process_state()
    return list(range(state.process_index, num_chunks, state.num_processes))


def assemble_rows(
    num_rows: int, indices: list[int], local: dict[str, torch.Tensor], state: PartialState | None = None
) -> dict[str, torch.Tensor]:
    """Every process's rows put together, on every process.

    Each process owns the rows `indices` of each named tensor (`local[name]` holds them in that order); the result
    has all `num_rows` rows in their own places. Rows are written by index into zeros and summed across processes,
    which is exact: each row has exactly one non-zero contributor.

    Raises:
        ValueError: if the processes do not cover every row exactly once.
    """
    from accelerate.utils import reduce

    state = state or process_state()
    device = state.device if state.backend == "nccl" else torch.device("cpu")
    index = torch.tensor(indices, dtype=torch.long)
    owners = torch.zeros(num_rows, dtype=torch.long).index_add_(0, index, torch.ones(len(indices), dtype=torch.long))
    result = {}
    for name, tensor in local.items():
        full = torch.zeros((num_rows, *tensor.shape[1:]), dtype=tensor.dtype)
        full[index] = tensor.cpu()
        result[name] = reduce(full.to(device), "sum").to(tensor.device) if state.num_processes > 1 else full
    if state.num_processes > 1:
        owners = reduce(owners.to(device), "sum").cpu()
    if not bool((owners == 1).all()):
        raise ValueError(f"The processes' rows do not cover {num_rows} rows exactly once: counts {owners.tolist()}.")
    return result


def on_main_process(state: PartialState, write: Callable[[], Any]) -> Any:
    """Run `write()` on the main process only, then synchronise every process.

    Returns:
        What `write()` returned on the main process, `None` on the others.
    """
    result = write() if state.is_main_process else None
    state.wait_for_everyone()
    return result
