"""Forward hooks: capture module inputs/outputs, stop a forward early, run the model from a given block on.

This is the only module that registers hooks or swaps a module's forward.
"""

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a hook to end a forward pass once everything needed has been captured."""


def hidden_of(output: Any) -> torch.Tensor:
    """The hidden-state tensor of a block's output (a tensor, or a tuple whose first item is the tensor)."""
    return output[0] if isinstance(output, tuple) else output


def with_hidden(output: Any, hidden: torch.Tensor) -> Any:
    """`output` with its hidden-state tensor replaced by `hidden`, keeping the container type."""
    return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden


@contextlib.contextmanager
def capture(
    model: nn.Module,
    inputs: list[str] = (),
    outputs: list[str] = (),
    stop_after: str | None = None,
    stop_before: str | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Record the first positional input of the modules named in `inputs` and the (hidden) output of those in
    `outputs`, keyed by module name; optionally stop the forward right before or after a module.

    Run the forward inside `run_until_stopped` (or catch [`StopForward`]) when a stop module is given.
    """
    store: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name in inputs:

            def pre_hook(module, args, kwargs, name=name):
                store["in:" + name] = args[0] if args else next(iter(kwargs.values()))
                if name == stop_before:
                    raise StopForward

            handles.append(model.get_submodule(name).register_forward_pre_hook(pre_hook, with_kwargs=True))
        if stop_before is not None and stop_before not in inputs:

            def stop_pre_hook(module, args):
                raise StopForward

            handles.append(model.get_submodule(stop_before).register_forward_pre_hook(stop_pre_hook))
        for name in outputs:

            def hook(module, args, output, name=name):
                store["out:" + name] = hidden_of(output)
                if name == stop_after:
                    raise StopForward

            handles.append(model.get_submodule(name).register_forward_hook(hook))
        if stop_after is not None and stop_after not in outputs:

            def stop_hook(module, args, output):
                raise StopForward

            handles.append(model.get_submodule(stop_after).register_forward_hook(stop_hook))
        yield store
    finally:
        for handle in handles:
            handle.remove()


def run_until_stopped(forward: Callable[[], Any]) -> Any:
    """Call `forward()`, treating [`StopForward`] as a normal end."""
    try:
        return forward()
    except StopForward:
        return None


@contextlib.contextmanager
def first_output(module: nn.Module) -> Iterator[list]:
    """Within the context, the returned list receives `module`'s first output as it is returned (its container
    type included, e.g. for [`skip_blocks`])."""
    kept: list = []

    def hook(module, args, output):
        if not kept:
            kept.append(output)

    handle = module.register_forward_hook(hook, prepend=True)
    try:
        yield kept
    finally:
        handle.remove()


@contextlib.contextmanager
def skip_blocks(blocks: list[nn.Module], last_output: Callable[[], torch.Tensor], template_output: Any):
    """Replace the forward of `blocks` (the first blocks of the stack, in order) so they do no work: every block but
    the last passes its input through, and the last returns `last_output()` in the container type of
    `template_output`. The rest of the model then runs normally from the block after them.
    """
    had_instance_forward = ["forward" in vars(block) for block in blocks]
    originals = [block.forward for block in blocks]

    def passthrough(*args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        return with_hidden(template_output, hidden)

    def last(*args, **kwargs):
        return with_hidden(template_output, last_output())

    try:
        for block in blocks[:-1]:
            block.forward = passthrough
        blocks[-1].forward = last
        yield
    finally:
        for block, original, had in zip(blocks, originals, had_instance_forward):
            if had:
                block.forward = original
            else:
                del block.forward


class LowRankAdditions:
    """Exact low-rank updates applied by forward hooks instead of being added to the weights: every hooked module
    outputs `f(x) + (x A^T) B^T`, the product computed in float32 from float32 factors (as an un-merged peft LoRA
    adapter does), so nothing is rounded to the weights' dtype. The updates of one module are concatenated into one
    pair of factors.

    Args:
        model (`nn.Module`): the model whose modules are hooked.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.enabled = True
        self._handles: dict[str, Any] = {}

    def add(self, module_name: str, lora_B: torch.Tensor, lora_A: torch.Tensor) -> None:
        """Add `lora_B @ lora_A` (`(d_out, r)` and `(r, d_in)`) to the update of `module_name`."""
        lora_B, lora_A = lora_B.detach().float(), lora_A.detach().float()
        if module_name in self.factors:
            current_B, current_A = self.factors[module_name]
            lora_B, lora_A = torch.cat([current_B, lora_B], dim=1), torch.cat([current_A, lora_A], dim=0)
        self.factors[module_name] = (lora_B, lora_A)
        if module_name not in self._handles:
            module = self.model.get_submodule(module_name)
            self._handles[module_name] = module.register_forward_hook(self._hook(module_name))

    def _hook(self, module_name: str) -> Callable:
        def hook(module, args, output):
            if not self.enabled:
                return output
            inputs = args[0]
            lora_B, lora_A = self.factors[module_name]
            if lora_A.device != inputs.device:
                lora_B, lora_A = lora_B.to(inputs.device), lora_A.to(inputs.device)
                self.factors[module_name] = (lora_B, lora_A)
            update = (inputs.float() @ lora_A.T) @ lora_B.T
            return (output.float() + update).to(output.dtype)

        return hook

    def clear(self) -> None:
        """Remove every update and hook."""
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()
        self.factors.clear()

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Within the context the hooked modules compute `f(x)` alone."""
        enabled, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = enabled
