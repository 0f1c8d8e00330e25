"""Second-moment statistics C = E[k k^T] of the edited modules' inputs over a text corpus, cached on disk.

One forward pass serves every edited layer (hooks on each, the forward stopped right before the last edited module);
`sum(k k^T)` is accumulated in float64 (each batch's product in float32, then added to a float64 sum) with a token
count. With several processes (accelerate), batches are split between ranks and the sums reduced. Results are cached
per module in safetensors files named by a hash of everything that determines them, written atomically and verified
by checksum on load.
"""

import hashlib
import json
import logging
import os
import random
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import reduce
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .distributed import process_state
from .tokenization import pad_batch, pad_token_id
from .tracing import capture, run_until_stopped


logger = logging.getLogger(__name__)

STATS_FORMAT_VERSION = 1
MODEL_SAMPLES = "model-samples"


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


def default_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "memit_hf" / "stats"


def corpus_texts(corpus) -> list[str]:
    """Texts of a statistics corpus: a `datasets.Dataset` with a `text` column, a list of strings, or text file paths
    (a path string, `Path`, or a list of them; files are split into documents at blank lines).

    Raises:
        ValueError: if the corpus has no usable text.
    """
    if hasattr(corpus, "column_names"):
        if "text" not in corpus.column_names:
            raise ValueError(f"`stats_dataset` must have a `text` column, found {corpus.column_names}.")
        texts = list(corpus["text"])
    else:
        items = [corpus] if isinstance(corpus, (str, os.PathLike)) else list(corpus)
        texts = []
        for item in items:
            if isinstance(item, os.PathLike) or (isinstance(item, str) and "\n" not in item and os.path.isfile(item)):
                texts.extend(re.split(r"\n[ \t]*\n", Path(item).read_text(encoding="utf-8")))
            elif isinstance(item, str):
                texts.append(item)
            else:
                raise ValueError(f"`stats_dataset` items must be strings or paths, got {type(item).__name__}.")
    texts = [t.strip() for t in texts if t and t.strip()]
    if not texts:
        raise ValueError("`stats_dataset` holds no non-empty text.")
    return texts


def _digest(data: Iterable[str]) -> str:
    h = hashlib.sha256()
    for item in data:
        h.update(item.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def model_fingerprint(model: PreTrainedModel) -> dict:
    """What identifies the weights behind the statistics: name, revision and a digest of the input embeddings."""
    embeddings = model.get_input_embeddings().weight.detach()
    sample = embeddings.flatten()[:: max(1, embeddings.numel() // 65536)].float().cpu().numpy().tobytes()
    return {
        "model": getattr(model.config, "_name_or_path", "") or "",
        "revision": getattr(model.config, "_commit_hash", None),
        "model_type": model.config.model_type,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "embedding_digest": hashlib.sha256(sample).hexdigest()[:16],
    }


def statistics_fingerprint(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, module: str, corpus_id: str, args
) -> dict:
    return {
        "format_version": STATS_FORMAT_VERSION,
        **model_fingerprint(model),
        "module": module,
        "tokenizer": getattr(tokenizer, "name_or_path", "") or "",
        "vocab_size": len(tokenizer),
        "corpus": corpus_id,
        "num_tokens": args.stats_num_tokens,
        "max_length": args.stats_max_length,
        "seed": args.seed,
        "accumulation": "float64",
    }


def fingerprint_key(fingerprint: dict) -> str:
    """A short hash of a statistics fingerprint: the cache file's key, also recorded in exported edit metadata."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:24]


def _cache_paths(cache_dir: Path, fingerprint: dict) -> tuple[Path, Path]:
    stem = fingerprint["module"].replace("/", "_") + "-" + fingerprint_key(fingerprint)
    return cache_dir / f"{stem}.safetensors", cache_dir / f"{stem}.json"


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_cached(cache_dir: Path, fingerprint: dict) -> SecondMoment | None:
    """The cached statistic for `fingerprint`, or None when absent, truncated, corrupted or stale (logged)."""
    tensor_path, meta_path = _cache_paths(cache_dir, fingerprint)
    if not tensor_path.exists() or not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta["fingerprint"] != fingerprint:
            raise ValueError("fingerprint mismatch")
        if _file_sha256(tensor_path) != meta["sha256"]:
            raise ValueError("checksum mismatch")
        tensors = load_file(str(tensor_path))
        total, count = tensors["total"], int(tensors["count"].item())
        if total.dtype != torch.float64 or total.ndim != 2 or total.shape[0] != total.shape[1] or count <= 0:
            raise ValueError("unexpected content")
        return SecondMoment(total, count)
    except Exception as error:  # any damage means recompute, never silent use
        logger.warning("Ignoring damaged statistics cache %s (%s); recomputing.", tensor_path, error)
        return None


def save_cached(cache_dir: Path, fingerprint: dict, moment: SecondMoment) -> Path:
    """Write the statistic atomically (temporary file, then rename) with its fingerprint and checksum."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    tensor_path, meta_path = _cache_paths(cache_dir, fingerprint)
    with tempfile.NamedTemporaryFile(dir=cache_dir, suffix=".tmp", delete=False) as handle:
        tmp_tensor = Path(handle.name)
    save_file({"total": moment.total.contiguous(), "count": torch.tensor([moment.count])}, str(tmp_tensor))
    meta = {"fingerprint": fingerprint, "sha256": _file_sha256(tmp_tensor), "count": moment.count}
    with tempfile.NamedTemporaryFile("w", dir=cache_dir, suffix=".tmp", delete=False) as handle:
        json.dump(meta, handle, indent=2)
        tmp_meta = Path(handle.name)
    os.replace(tmp_tensor, tensor_path)
    os.replace(tmp_meta, meta_path)
    return tensor_path


def token_pieces(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], num_tokens: int, max_length: int, seed: int
) -> list[list[int]]:
    """Token pieces of at most `max_length` tokens, from the texts in a seeded random order, until `num_tokens`
    tokens are gathered (the last piece is cut to the budget)."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    pieces, total = [], 0
    step = 256
    for start in range(0, len(order), step):
        batch = [texts[i] for i in order[start : start + step]]
        for ids in tokenizer(batch, add_special_tokens=True)["input_ids"]:
            for offset in range(0, len(ids), max_length):
                piece = list(ids[offset : offset + max_length])[: num_tokens - total]
                if len(piece) < 2 and offset > 0:
                    continue
                pieces.append(piece)
                total += len(piece)
                if total >= num_tokens:
                    return pieces
    return pieces


def _batches(pieces: list[list[int]], batch_tokens: int) -> list[list[list[int]]]:
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
    from .architectures import is_transposed

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
    batches = _batches(pieces, batch_tokens)
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


@torch.no_grad()
def sample_corpus(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, num_texts: int, length: int, seed: int
) -> list[str]:
    """Offline default statistics source: `num_texts` texts of `length` tokens sampled from the model itself (top-k
    50, seeded), started from common sentence openings. Works with no corpus and no network."""
    starters = ["The", "In", "A", "It", "This", "He", "She", "We", "There", "One", "After", "When"]
    pad = pad_token_id(tokenizer)
    texts = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, num_texts, 32):
            prompts = [starters[(start + i) % len(starters)] for i in range(min(32, num_texts - start))]
            encoded = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
            width = max(len(e) for e in encoded)
            input_ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=model.device)
            mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=model.device)
            output = model.generate(
                input_ids=input_ids, attention_mask=mask, do_sample=True, top_k=50, top_p=1.0, temperature=1.0,
                max_new_tokens=length, min_new_tokens=length, pad_token_id=pad, eos_token_id=None,
            )  # fmt: skip
            texts += tokenizer.batch_decode(output, skip_special_tokens=True)
    return texts
