"""What determines a module's statistics, as a JSON-able fingerprint: the model (identity, dtype and a digest of every
weight the module's inputs depend on), the tokenizer, the corpus and the collection settings."""

import hashlib
import json
import weakref
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..architectures import ModelLayout
from ..settings import StatisticsSettings
from ..weights import read_parameter


STATS_FORMAT_VERSION = 2
DIGEST_SAMPLES = 4096
"""Elements sampled (evenly strided) from each weight tensor for its digest, besides its exact float64 sums."""
MODEL_FIELDS = (
    "format_version",
    "model_type",
    "num_parameters",
    "dtype",
    "embedding_digest",
    "weights_digest",
    "module",
    "vocab_size",
    "accumulation",
)
"""The fingerprint fields a model must match to use statistics collected elsewhere (`stats_repo`): everything the
module's inputs depend on. The others name where the model and tokenizer were loaded from or describe the corpus
and the collection settings (`corpus`, `num_tokens`, `max_length`, `seed`), which the statistics bring with them."""
PROVENANCE_FIELDS = ("model", "revision", "tokenizer")
"""The fingerprint fields that say where the model and tokenizer were loaded from (a Hub id and commit, a local
folder, a GGUF file): recorded with the statistics, but not part of their key (see [`fingerprint_key`]). The same
weights and tokenizer loaded from another place have the same statistics: the weights are digested
(`embedding_digest`, `weights_digest`) and the corpus is identified by its exact token pieces (`corpus`)."""


def tensor_digest(tensor: torch.Tensor) -> str:
    """A cheap, change-sensitive digest of a tensor: its shape and dtype, its float64 sum and sum of squares (which
    move when any single element moves), and the bytes of `DIGEST_SAMPLES` evenly strided elements."""
    flat = tensor.detach().reshape(-1)
    sums = torch.stack([flat.sum(dtype=torch.float64), torch.linalg.vector_norm(flat, dtype=torch.float64)])
    sample = flat[:: max(1, flat.numel() // DIGEST_SAMPLES)].float()
    h = hashlib.sha256(f"{tuple(tensor.shape)}|{tensor.dtype}".encode())
    h.update(sums.cpu().numpy().tobytes())
    h.update(sample.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def upstream_parameters(model: PreTrainedModel, layout: ModelLayout, layer: int) -> list[tuple[str, torch.Tensor]]:
    """The parameters the input of block `layer`'s edited module can depend on: everything outside the decoder
    stack (embeddings, position embeddings, final norm) except an untied LM head, plus blocks `0..layer`; with their
    values wherever they live (see [`~memit_hf.weights.read_parameter`])."""
    blocks = layout.layers_attr + "."
    wanted = tuple(f"{layout.layer_name(i)}." for i in range(layer + 1))
    output = model.get_output_embeddings()
    head = output.weight if output is not None else None
    tied = head is not None and head is model.get_input_embeddings().weight
    chosen = []
    for module_name, module in model.named_modules():
        for local_name, parameter in module.named_parameters(recurse=False):
            name = f"{module_name}.{local_name}" if module_name else local_name
            if name.startswith(blocks) and not name.startswith(wanted):
                continue
            if name.startswith(blocks) or tied or parameter is not head:
                chosen.append((name, read_parameter(module, local_name)))  # offloaded values too
    return chosen


def weights_digest(parameters: list[tuple[str, torch.Tensor]], memo: dict | None = None) -> str:
    """One digest of named parameters (see [`tensor_digest`]).

    Args:
        memo (`dict`, *optional*): digests of earlier calls, reused for the same tensor object while its storage
            and in-place version counter are unchanged (every in-place write bumps the counter), so overlapping
            layers digest each tensor once.
    """
    h = hashlib.sha256()
    for name, parameter in parameters:
        h.update(f"{name}={_memoised_digest(parameter, memo)};".encode())
    return h.hexdigest()[:24]


MEMO_PRUNE_SIZE = 1024
"""The size at which a digest memo drops the entries of freed tensors."""


def _memoised_digest(tensor: torch.Tensor, memo: dict | None) -> str:
    """[`tensor_digest`] of `tensor`, read from `memo` while the same tensor object is alive with the same storage
    and in-place version counter (a value read afresh from an offload folder is a new object: digested again, never
    matched with a freed tensor's address). One entry per tensor object; entries of freed tensors are dropped as the
    memo grows."""
    if memo is None:
        return tensor_digest(tensor)
    state = (tensor.data_ptr(), tensor._version, tuple(tensor.shape), tensor.dtype)
    held = memo.get(id(tensor))
    if held is not None and held[0]() is tensor and held[1] == state:
        return held[2]
    if len(memo) >= MEMO_PRUNE_SIZE:
        for key in [key for key, entry in memo.items() if entry[0]() is None]:
            del memo[key]
    digest = tensor_digest(tensor)
    memo[id(tensor)] = (weakref.ref(tensor), state, digest)
    return digest


def model_identity(model: PreTrainedModel, memo: dict | None = None) -> dict[str, Any]:
    """Name, revision, type, size and dtype of `model` (what exported edit metadata records about the base model).

    Args:
        memo (`dict`, *optional*): tensor digests to reuse for the input embeddings (see [`weights_digest`]): a
            large vocabulary's embedding digest costs a fraction of a second on a CPU, once per edited layer without it.
    """
    return {
        "model": getattr(model.config, "_name_or_path", "") or "",
        "revision": getattr(model.config, "_commit_hash", None),
        "model_type": model.config.model_type,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(model.dtype).removeprefix("torch."),
        "embedding_digest": _memoised_digest(read_parameter(model.get_input_embeddings()), memo),
    }


def statistics_fingerprint(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    layout: ModelLayout,
    layer: int,
    corpus_id: str,
    settings: StatisticsSettings,
    memo: dict | None = None,
) -> dict[str, Any]:
    """Everything that determines the statistics of block `layer`'s edited module.

    Args:
        corpus_id (`str`): the corpus identity (see [`~memit_hf.statistics.StatisticsProvider`]).
        settings ([`~memit_hf.settings.StatisticsSettings`]): its `num_tokens`, `max_length` and `seed` are recorded.
        memo (`dict`, *optional*): tensor digests to reuse (see [`weights_digest`]).

    Raises:
        TypeError: if `settings` is not a `StatisticsSettings`.
    """
    if not isinstance(settings, StatisticsSettings):
        raise TypeError(
            f"`settings` must be a `StatisticsSettings` (e.g. `args.statistics_settings()`), got "
            f"{type(settings).__name__}."
        )
    return {
        "format_version": STATS_FORMAT_VERSION,
        **model_identity(model, memo),
        "weights_digest": weights_digest(upstream_parameters(model, layout, layer), memo),
        "module": layout.edit_name(layer),
        "tokenizer": getattr(tokenizer, "name_or_path", "") or "",
        "vocab_size": len(tokenizer),
        "corpus": corpus_id,
        "num_tokens": settings.num_tokens,
        "max_length": settings.max_length,
        "seed": settings.seed,
        "accumulation": "float64",
    }


def fingerprint_key(fingerprint: dict[str, Any]) -> str:
    """A short hash of what determines a module's statistics: the fingerprint less its [`PROVENANCE_FIELDS`]. The
    cache file's key, also recorded in editor states and exported edit metadata; the same model loaded from another
    path (a Hub id, a local copy, a converted GGUF file) finds the same statistics."""
    identity = {name: value for name, value in fingerprint.items() if name not in PROVENANCE_FIELDS}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def legacy_fingerprint_key(fingerprint: dict[str, Any]) -> str:
    """The key of earlier development versions, which hashed the whole fingerprint, [`PROVENANCE_FIELDS`] included:
    cache entries and editor states made with them are still found under it (see
    [`~memit_hf.statistics.StatisticsCache.load`] and [`~memit_hf.Editor.load_state`])."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:24]


def tokenizer_digest(tokenizer: PreTrainedTokenizerBase) -> str:
    """A digest of what a tokenizer does, independent of where it was loaded from: the fast tokenizer's full
    serialisation (vocabulary, merges, normaliser, pre- and post-processing; a slow tokenizer's sorted vocabulary)
    and its special tokens. The chat template is left out: it does not change how text is tokenised."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode("utf-8"))
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode("utf-8"))
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode("utf-8"))
    return h.hexdigest()[:16]


def fingerprint_differences(
    expected: dict[str, Any], found: dict[str, Any], fields: tuple[str, ...] = MODEL_FIELDS
) -> dict[str, tuple[Any, Any]]:
    """The `fields` whose values differ between two fingerprints.

    Returns:
        `dict[str, tuple]`: by field, `(expected value, found value)` (`None` where a fingerprint lacks the field).
    """
    return {name: (expected.get(name), found.get(name)) for name in fields if expected.get(name) != found.get(name)}
