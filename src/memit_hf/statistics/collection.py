"""One pass over the corpus that sums `k k^T` of every edited module's input.

Hooks sit on each edited module and the forward stops right before the last one; `sum(k k^T)` is accumulated in
float64 (each batch's product in float32, then added to a float64 sum, see [`add_gram`]) with a token count. With several processes
(accelerate), batches are dealt round-robin between ranks, whole and unpadded, and the sums reduced once at the end.
A [`StatisticsCheckpoint`] saves each process's partial sums periodically, and a collection resumes from it.
"""

import logging
from dataclasses import dataclass

import torch
from accelerate.utils import reduce
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..architectures import is_transposed
from ..distributed import owned_chunks, process_state
from ..progress import progress_bar
from ..tokenization import pad_batch, pad_token_id
from ..tracing import capture, run_until_stopped
from .checkpoint import CollectionProgress, StatisticsCheckpoint
from .gram import add_gram, mirror_gram


logger = logging.getLogger(__name__)


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


class CollectionInterrupted(RuntimeError):
    """Raised on every process by [`collect_second_moments`] when `max_batches` stopped it before the end (after
    saving the checkpoint, if one was given)."""


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


def input_dim(module: torch.nn.Module) -> int:
    """The size `d_in` of `module`'s input: its weight's second dimension, or the first for a weight stored
    transposed (GPT-2's `Conv1D`, see [`~memit_hf.architectures.is_transposed`])."""
    return module.weight.shape[0] if is_transposed(module) else module.weight.shape[1]


def _reduce_device(state) -> torch.device:
    return torch.device("cpu") if state.backend in (None, "gloo") else state.device


@torch.no_grad()
def collect_second_moments(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    modules: list[str],
    pieces: list[list[int]],
    batch_tokens: int = 4096,
    show_progress: bool = True,
    checkpoint: StatisticsCheckpoint | None = None,
    max_batches: int | None = None,
) -> dict[str, SecondMoment]:
    """Sum `k k^T` of the inputs of `modules` over every token of `pieces`, in one forward pass per batch that stops
    right before the last module in execution order.

    Batches are dealt round-robin between accelerate processes (`rank, rank + world, ...`, whole, no padding: a
    process may get none) and the sums reduced at the end. The sums equal one process's up to the order of the
    float64 additions; the token count is exact.

    Args:
        model (`PreTrainedModel`), tokenizer (`PreTrainedTokenizerBase`): the model whose inputs are summed.
        modules (`list[str]`): the module names.
        pieces (`list[list[int]]`): token pieces (see [`token_pieces`]); right-padded into batches of at most
            `batch_tokens` padded tokens (see [`pack_batches`]).
        show_progress (`bool`, *optional*, defaults to `True`): a progress bar on the main process.
        checkpoint ([`StatisticsCheckpoint`], *optional*): resume from this process's saved progress if there is
            any, and save it whenever [`StatisticsCheckpoint.due`] says so. The caller removes it once the result is
            stored.
        max_batches (`int`, *optional*): sum at most this many batches of this process's share in this call; if the
            collection is then unfinished on any process, save the checkpoint (if given) and raise
            [`CollectionInterrupted`] on every process. A later call with the same checkpoint continues.

    Returns:
        `dict[str, SecondMoment]`: by module name, in execution order.

    Raises:
        CollectionInterrupted: see `max_batches`.
    """
    state = process_state()
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    modules = sorted(modules, key=order.__getitem__)
    dims = {name: input_dim(model.get_submodule(name)) for name in modules}
    batches = pack_batches(pieces, batch_tokens)
    mine = owned_chunks(len(batches), state)
    pad = pad_token_id(tokenizer)
    progress = checkpoint.load(dims, len(mine)) if checkpoint is not None else None
    if progress is None:
        totals = {name: torch.zeros(dim, dim, dtype=torch.float64) for name, dim in dims.items()}
        progress = CollectionProgress(totals, 0, 0)
    elif progress.position > 0:
        logger.info(
            "Resuming the statistics collection at batch %d of %d (process %d) from %s.",
            progress.position,
            len(mine),
            state.process_index,
            checkpoint.path,
        )
    # The sums move to the device the module's inputs arrive on (its execution device, also for a module offloaded
    # by accelerate, whose weight is on "meta") at the first batch and stay there: no per-batch transfer off an
    # accelerator. Only their upper block triangle is accumulated until `mirror_gram` at the end.
    if checkpoint is not None:
        checkpoint.start(progress.position)
    end = len(mine) if max_batches is None else min(len(mine), progress.position + max_batches)
    bar = progress_bar(
        show_progress and state.is_main_process,
        total=len(mine),
        initial=progress.position,
        desc="covariance statistics",
    )
    for position in range(progress.position, end):
        batch = batches[mine[position]]
        input_ids, mask = pad_batch(batch, pad, model.device)
        with capture(model, inputs=modules, stop_before=modules[-1]) as store:
            run_until_stopped(lambda ids=input_ids, m=mask: model(input_ids=ids, attention_mask=m, use_cache=False))
        tokens = sum(len(piece) for piece in batch)
        # Right padding: the real tokens' rows, picked once per batch (none to drop when every piece is as long).
        rows = None if tokens == mask.numel() else mask.reshape(-1).nonzero().squeeze(1)
        for name in modules:
            hidden = store["in:" + name]
            keys = hidden.reshape(-1, hidden.shape[-1])  # (batch * length, d_in)
            if rows is not None:
                keys = keys.index_select(0, rows.to(keys.device))  # (tokens, d_in)
            if progress.totals[name].device != keys.device:
                progress.totals[name] = progress.totals[name].to(keys.device)
            add_gram(progress.totals[name], keys.float(), mirror=False)
        progress.count += tokens
        progress.position = position + 1
        bar.update(1)
        if checkpoint is not None and progress.position < len(mine) and checkpoint.due(progress.position):
            checkpoint.save(progress, len(mine))
    bar.close()
    unfinished = torch.tensor([int(progress.position < len(mine))])
    if state.num_processes > 1 and max_batches is not None:
        unfinished = reduce(unfinished.to(_reduce_device(state)), "sum").cpu()
    if int(unfinished.item()) > 0:
        if checkpoint is not None:
            checkpoint.save(progress, len(mine))
        raise CollectionInterrupted(
            f"Stopped after `max_batches={max_batches}`: {progress.position} of {len(mine)} batches of process "
            f"{state.process_index} are summed" + (f", saved in {checkpoint.path}." if checkpoint else ".")
        )
    totals = progress.totals
    count = torch.tensor([progress.count], dtype=torch.int64)
    if state.num_processes > 1:
        device = _reduce_device(state)
        totals = {name: reduce(total.to(device), "sum") for name, total in totals.items()}
        count = reduce(count.to(device), "sum")
    return {name: SecondMoment(mirror_gram(totals[name].cpu()), int(count.item())) for name in modules}
