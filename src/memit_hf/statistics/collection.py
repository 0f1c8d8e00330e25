"""One pass over the corpus that sums `k k^T` of every edited module's input.

Hooks sit on each edited module and the forward stops right before the last one; `sum(k k^T)` is accumulated in
float64 (each batch's product in float32, then added to a float64 sum) with a token count. With several processes
(accelerate), batches are split between ranks and the sums reduced.
"""

from dataclasses import dataclass

import torch
from accelerate.utils import reduce
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..architectures import is_transposed
from ..distributed import process_state
from ..tokenization import pad_batch, pad_token_id
from ..tracing import capture, run_until_stopped


@dataclass
class SecondMoment:
    """Uncentred second moment of one module's input.

    Args:
        total (`torch.Tensor`): `(d_in, d_in)` float64 sum of `k k^T` over all tokens.
        count (`int`): number of tokens summed.
    """

    total: torch.Tensor
    count: int

    def mean(self) -> torch.Tensor:
        """E[k k^T] as float64, `(d_in, d_in)`."""
        return self.total / self.count


def pack_batches(pieces: list[list[int]], batch_tokens: int) -> list[list[list[int]]]:
    """Group pieces sorted by length so that each padded batch holds at most `batch_tokens` tokens."""
    ordered = sorted(pieces, key=len, reverse=True)
    batches, current = [], []
    for piece in ordered:
        if current and len(current[0]) * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current = []
        current.append(piece)
    if current:
        batches.append(current)
    return batches


def add_gram(total: torch.Tensor, keys: torch.Tensor, blocks: int = 4) -> None:
    """`total += keys^T keys` (float64 accumulator, float32 products), computing only the upper block triangle of
    the symmetric product and mirroring it: about 40 % fewer FLOPs than a full matrix product."""
    dim = keys.shape[1]
    edges = [dim * i // blocks for i in range(blocks + 1)]
    for i in range(blocks):
        rows = slice(edges[i], edges[i + 1])
        for j in range(i, blocks):
            cols = slice(edges[j], edges[j + 1])
            block = (keys[:, rows].T @ keys[:, cols]).double().cpu()
            total[rows, cols] += block
            if i != j:
                total[cols, rows] += block.T


def _input_dim(module: torch.nn.Module) -> int:
    return module.weight.shape[0] if is_transposed(module) else module.weight.shape[1]


@torch.no_grad()
def collect_second_moments(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    modules: list[str],
    pieces: list[list[int]],
    batch_tokens: int = 4096,
    show_progress: bool = True,
) -> dict[str, SecondMoment]:
    """Sum `k k^T` of the inputs of `modules` over every token of `pieces`, in one forward pass per batch that stops
    right before the last module in execution order. Batches are split between accelerate processes and summed.
    """
    state = process_state()
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    modules = sorted(modules, key=order.__getitem__)
    batches = pack_batches(pieces, batch_tokens)
    pad = pad_token_id(tokenizer)
    totals: dict[str, torch.Tensor] = {}
    count = torch.zeros((), dtype=torch.float64)
    with state.split_between_processes(list(range(len(batches)))) as mine:
        progress = tqdm(mine, desc="covariance statistics", disable=not show_progress or not state.is_main_process)
        for index in progress:
            input_ids, mask = pad_batch(batches[index], pad, model.device)
            with capture(model, inputs=modules, stop_before=modules[-1]) as store:
                run_until_stopped(
                    lambda ids=input_ids, m=mask: model(input_ids=ids, attention_mask=m, use_cache=False)
                )
            keep = mask.bool()
            for name in modules:
                keys = store["in:" + name][keep].float()  # (tokens, d_in)
                if name not in totals:
                    totals[name] = torch.zeros(keys.shape[1], keys.shape[1], dtype=torch.float64)
                add_gram(totals[name], keys)
            count += int(keep.sum())
    for name in modules:
        if name not in totals:  # this rank got no batch
            totals[name] = torch.zeros(_input_dim(model.get_submodule(name)), _input_dim(model.get_submodule(name)))
            totals[name] = totals[name].double()
    if state.num_processes > 1:
        device = state.device
        totals = {name: reduce(t.to(device), "sum").cpu() for name, t in totals.items()}
        count = reduce(count.to(device), "sum").cpu()
    return {name: SecondMoment(totals[name], int(count.item())) for name in modules}
