"""Builders for tiny, seeded, offline test models, tokenizers, corpora and requests, and a fake Hub."""

import contextlib
import fnmatch
import shutil
from collections.abc import Mapping
from types import MappingProxyType, SimpleNamespace
from unittest import mock

import torch
from huggingface_hub import HfApi
from huggingface_hub.errors import LocalEntryNotFoundError
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.modeling_outputs import CausalLMOutputWithPast


INIT_RANGE = 0.02
TINY_MODEL_TYPES = ["gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2", "gemma3_text"]
"""The model types that fixtures parametrise over ([`tiny_config`] covers every type with a layout)."""
TINY_HIDDEN_SIZE = 32
TINY_INTERMEDIATE_SIZE = 64
TINY_NUM_LAYERS = 3

_SENTENCES = [
    "The Eiffel Tower is located in the city of Paris.",
    "The Colosseum is located in the city of Rome.",
    "Big Ben is located in the city of London.",
    "The Brandenburg Gate is located in the city of Berlin.",
    "The capital of France is Paris and the capital of Italy is Rome.",
    "The iPhone is developed by Apple. Windows is developed by Microsoft.",
    "Lionel Messi plays the sport of football. Michael Jordan plays basketball.",
    "Danielle Darrieux speaks the language of French. Toko Yasuda plays the guitar.",
    "Therefore the river flows to the sea. Because the weather is cold, I stay home.",
    "You can see the mountains from the window. I think it will rain today.",
    "The company was founded in the year of the great storm and grew quickly.",
    "A quick brown fox jumps over the lazy dog near the old bridge in Madrid.",
]


def tiny_corpus() -> list[str]:
    """A small deterministic English corpus (sentences recombined) for covariance statistics in tests."""
    texts = []
    n = len(_SENTENCES)
    for i in range(48):
        texts.append(" ".join(_SENTENCES[(i * k) % n] for k in range(1, 2 + i % 4)))
    return texts


def build_tiny_tokenizer(add_bos: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the tiny corpus (GPT-2 style leading-space tokens).

    With `add_bos=True` it prepends `<s>` to every encoded text, like Llama/Gemma tokenizers.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_SENTENCES + tiny_corpus(), trainer=trainer)
    if add_bos:
        bos = tokenizer.token_to_id("<s>")
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side="right",
    )


def tiny_config(model_type: str, vocab_size: int, **overrides) -> PretrainedConfig:
    """A config of `model_type` for a tiny test model: `TINY_NUM_LAYERS` layers, d_model `TINY_HIDDEN_SIZE`, 4
    attention heads (head size 8; 2 key/value heads for Llama-style models) and 128 positions.

    The MLP hidden size is `TINY_INTERMEDIATE_SIZE`, except for GPT-2 and GPT-J, which keep the GPT default of
    4 * d_model. Covers every model type of `memit_hf.architectures.MODEL_TYPE_TO_LAYOUT` (`gemma3` with a tiny vision
    tower); other Llama-style model types get the Llama-style keyword arguments.

    Args:
        model_type (`str`):
            The `config.model_type`, e.g. `"gpt2"` or `"llama"`.
        vocab_size (`int`):
            The vocabulary size (usually `len(tokenizer)`).
        overrides:
            Keyword arguments of the config class that replace the tiny values or add to them (e.g. dropout
            probabilities).

    Returns:
        [`~transformers.PretrainedConfig`]: the config, built with `AutoConfig.for_model`.
    """
    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=INIT_RANGE)
    llama_like = dict(
        vocab_size=vocab_size,
        hidden_size=TINY_HIDDEN_SIZE,
        intermediate_size=TINY_INTERMEDIATE_SIZE,
        num_hidden_layers=TINY_NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        **ids,
    )
    if model_type in ("gpt2", "gptj"):
        values = dict(
            vocab_size=vocab_size,
            n_embd=TINY_HIDDEN_SIZE,
            n_layer=TINY_NUM_LAYERS,
            n_head=4,
            n_positions=128,
            **ids,
        )
        if model_type == "gptj":
            values["rotary_dim"] = 4
    elif model_type == "gpt_neo":
        values = dict(
            vocab_size=vocab_size,
            hidden_size=TINY_HIDDEN_SIZE,
            intermediate_size=TINY_INTERMEDIATE_SIZE,
            num_layers=TINY_NUM_LAYERS,
            num_heads=4,
            attention_types=[[["global", "local"], 1], [["global"], 1]],
            max_position_embeddings=128,
            **ids,
        )
    elif model_type == "gpt_neox":
        values = dict(
            vocab_size=vocab_size,
            hidden_size=TINY_HIDDEN_SIZE,
            intermediate_size=TINY_INTERMEDIATE_SIZE,
            num_hidden_layers=TINY_NUM_LAYERS,
            num_attention_heads=4,
            max_position_embeddings=128,
            **ids,
        )
    elif model_type == "gemma3":
        vision = dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        )
        values = dict(text_config=llama_like, vision_config=vision, mm_tokens_per_image=4, **ids)
    elif model_type == "gemma3_text":
        values = dict(llama_like, sliding_window=16)
    else:
        values = llama_like
    return AutoConfig.for_model(model_type, **{**values, **overrides})


def build_tiny_causal_lm(model_type: str, vocab_size: int, seed: int = 0, **config_overrides):
    """A randomly initialised causal LM of `model_type` (see [`tiny_config`]), float32, eval mode, built under a
    fixed seed; `config_overrides` go to [`tiny_config`] (e.g. dropout probabilities)."""
    config = tiny_config(model_type, vocab_size, **config_overrides)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.float().eval()


class OracleLM(nn.Module):
    """A fake causal LM whose logits put `margin` on the next input token (or on `fixed`), 0 elsewhere."""

    def __init__(self, vocab_size: int, margin: float = 5.0, fixed: int | None = None):
        super().__init__()
        self.vocab_size = vocab_size
        self.margin = margin
        self.fixed = fixed
        self.anchor = nn.Parameter(torch.zeros(1))

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def forward(self, input_ids, attention_mask=None):
        following = (
            torch.roll(input_ids, shifts=-1, dims=1) if self.fixed is None else torch.full_like(input_ids, self.fixed)
        )
        logits = nn.functional.one_hot(following, self.vocab_size).float() * self.margin
        return type("Output", (), {"logits": logits})()


TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)
"""A minimal chat template for the tiny tokenizer: `<s>user: {content}\n<s>assistant:`."""


def build_tiny_chat_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny tokenizer with `TINY_CHAT_TEMPLATE` as its chat template."""
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


class ScriptedConfig(PretrainedConfig):
    model_type = "scripted_test_lm"

    def __init__(self, vocab_size: int = 8, margin: float = 5.0, **kwargs):
        self.vocab_size = vocab_size
        self.margin = margin
        super().__init__(**kwargs)


class ScriptedLM(PreTrainedModel, GenerationMixin):
    """A fake causal LM with `generate` whose greedy continuation of each scripted prompt is known in advance.

    `script` maps a prompt (a tuple of token ids, exactly as the model receives it, without padding) to the token ids
    of its continuation. At every real position the logits put `margin` on one token and 0 elsewhere: when the
    tokens so far are a scripted prompt followed by the first `k` tokens of its continuation, on continuation token
    `k` (EOS once the continuation is complete); otherwise on EOS. Padded positions (attention mask 0) get zero logits.
    So greedy decoding writes the continuation and stops, and teacher-forced scoring gives the scripted tokens a low
    NLL and every other token the same high one. Assign `script` to change the model's behaviour (an "edit").
    """

    config_class = ScriptedConfig

    def __init__(self, config: ScriptedConfig, script: Mapping[tuple[int, ...], list[int]] | None = None):
        super().__init__(config)
        self.anchor = nn.Parameter(torch.zeros(1))
        self.script = dict(script or {})
        self.post_init()
        self.generation_config.use_cache = False  # every step sees the whole sequence

    def _next(self, ids: list[int]) -> int:
        for end in range(len(ids), 0, -1):
            continuation = self.script.get(tuple(ids[:end]))
            if continuation is not None:
                written = ids[end:]
                if continuation[: len(written)] == written:
                    return continuation[len(written)] if len(written) < len(continuation) else self.config.eos_token_id
        return self.config.eos_token_id

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        logits = torch.zeros(*input_ids.shape, self.config.vocab_size, device=input_ids.device)
        for row in range(input_ids.shape[0]):
            positions = attention_mask[row].nonzero().flatten().tolist()
            ids = input_ids[row, positions].tolist()
            for count, position in enumerate(positions, start=1):
                logits[row, position, self._next(ids[:count])] = self.config.margin
        return CausalLMOutputWithPast(logits=logits)


def scripted_lm(tokenizer, continuations: Mapping[str, str], chat: Mapping[str, str] | None = None) -> ScriptedLM:
    """A [`ScriptedLM`] that continues each plain prompt of `continuations` (encoded with the tokenizer's special
    tokens, as the evaluation encodes prompts) with its text, and answers each user message of `chat` (rendered by
    the tokenizer's chat template with the generation prompt, encoded without special tokens) with its text."""
    config = ScriptedConfig(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id
    )
    model = ScriptedLM(config)
    model.script = scripts(tokenizer, continuations, chat)
    return model.eval()


def scripts(tokenizer, continuations: Mapping[str, str], chat: Mapping[str, str] | None = None) -> dict:
    """The `ScriptedLM.script` of [`scripted_lm`]."""
    script = {}
    for prompt, text in continuations.items():
        script[tuple(tokenizer(prompt)["input_ids"])] = tokenizer(text, add_special_tokens=False)["input_ids"]
    for message, text in (chat or {}).items():
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], add_generation_prompt=True, tokenize=False
        )
        ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        script[tuple(ids)] = tokenizer(text, add_special_tokens=False)["input_ids"]
    return script


def tiny_requests() -> list[dict]:
    """Canonical-shape requests whose subjects and targets are in the tiny tokenizer's vocabulary."""
    return [
        {
            "prompt": "{} is located in the city of",
            "subject": "The Eiffel Tower",
            "target_new": "Rome",
            "target_true": "Paris",
            "paraphrase_prompts": ["Therefore The Eiffel Tower is located in the city of"],
            "neighborhood_prompts": ["The Colosseum is located in the city of"],
        },
        {
            "prompt": "{} is developed by",
            "subject": "The iPhone",
            "target_new": "Microsoft",
            "target_true": "Apple",
            "paraphrase_prompts": ["I think The iPhone is developed by"],
            "neighborhood_prompts": ["Windows is developed by"],
        },
        {
            "prompt": "{} plays the sport of",
            "subject": "Lionel Messi",
            "target_new": "basketball",
            "target_true": "football",
            "paraphrase_prompts": ["You can see Lionel Messi plays the sport of"],
            "neighborhood_prompts": ["Michael Jordan plays the sport of"],
        },
        {
            "prompt": "The capital of {} is",
            "subject": "France",
            "target_new": "Berlin",
            "target_true": "Paris",
            "paraphrase_prompts": ["Because the capital of France is"],
            "neighborhood_prompts": ["The capital of Italy is"],
        },
    ]


def subject_final_requests() -> list[dict]:
    """Canonical-shape requests whose subject ends the prompt: random tiny models respond strongly to an edit there,
    so after a MEMIT edit each target's first token is the argmax continuation on every tiny architecture."""
    return [
        {"prompt": "The city of {}", "subject": "the Eiffel Tower", "target_new": "Rome", "target_true": "Paris"},
        {"prompt": "I think {}", "subject": "the iPhone", "target_new": "Microsoft", "target_true": "Apple"},
        {"prompt": "Therefore {}", "subject": "Lionel Messi", "target_new": "basketball", "target_true": "football"},
        {"prompt": "The capital of {}", "subject": "France", "target_new": "Berlin", "target_true": "Paris"},
    ]


TINY_EDITING_VALUES = MappingProxyType(
    dict(
        layers=[0, 1],
        mom2_update_weight=1.0,
        v_num_grad_steps=40,
        v_lr=0.5,
        clamp_norm_factor=4.0,
        v_weight_decay=0.001,
    )
)
"""The editing settings that make MEMIT edits succeed on the tiny models (layers 0 and 1, small lambda, strong z
optimisation): what [`tiny_editing_arguments`] and [`tiny_edit_flags`] give."""


def tiny_edit_flags(**overrides) -> list[str]:
    """[`TINY_EDITING_VALUES`] as `memit-hf` flags (`--layers 0 1 --mom2_update_weight 1.0 ...`); `overrides` change
    a value, and a value of `None` leaves its flag out (the command's default)."""
    flags = []
    for name, value in {**TINY_EDITING_VALUES, **overrides}.items():
        if value is not None:
            flags += [f"--{name}", *(map(str, value) if isinstance(value, list) else [str(value)])]
    return flags


def tiny_editing_arguments(cache_dir, **overrides):
    """`EditingArguments` that make MEMIT edits succeed on the tiny models (layers 0 and 1, small lambda, strong z
    optimisation), with statistics cached under `cache_dir` so tests never write to the user's cache. `overrides`
    may name method hyperparameters flat (see `EditingArguments.from_flat`); the small lambda goes to every method
    that has `mom2_update_weight` and is dropped for the others."""
    from memit_hf.algorithms import get_config_class
    from memit_hf.arguments import EditingArguments

    values = dict(TINY_EDITING_VALUES, stats_cache_dir=str(cache_dir))
    values.update(overrides)
    if "mom2_update_weight" not in get_config_class(values.get("algorithm", "memit")).field_names():
        values.pop("mom2_update_weight")
    return EditingArguments.from_flat(values)


def next_token_argmax(model, tokenizer, prompts: list[str]) -> list[int]:
    """The argmax of the next-token logits after each full prompt (encoded with the tokenizer's special tokens)."""
    from memit_hf.tokenization import encode_texts

    result = []
    with torch.no_grad():
        for ids in encode_texts(tokenizer, prompts):
            result.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return result


def parameters_snapshot(model) -> dict[str, torch.Tensor]:
    """A detached copy of every named parameter and buffer, for bit-exact comparisons."""
    state = {name: p.detach().clone() for name, p in model.named_parameters()}
    state.update({"buffer:" + name: b.detach().clone() for name, b in model.named_buffers()})
    return state


def changed_tensors(model, snapshot: dict[str, torch.Tensor]) -> list[str]:
    """Names of the parameters and buffers of `model` that are not bit-identical to `snapshot`."""
    current = parameters_snapshot(model)
    return sorted(name for name, tensor in snapshot.items() if not torch.equal(current[name], tensor))


FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeDatasetHub:
    """Keeps the last uploaded folder of each repository and serves it back through `snapshot_download` (only the
    files matching `allow_patterns`, in a folder named by the commit, as the Hub cache does); records every call."""

    def __init__(self, directory):
        self.directory = directory
        self.created, self.uploads, self.downloads = [], [], []
        self.offline = False

    def repo(self, repo_id):
        return self.directory / "repos" / repo_id.replace("/", "--")

    def create_repo(self, api, repo_id, private=None, exist_ok=False, repo_type=None, **kwargs):
        self.created.append({"repo_id": repo_id, "private": private, "repo_type": repo_type, "token": api.token})
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, api, folder_path, repo_id, repo_type=None, commit_message=None, revision=None, **kw):
        shutil.rmtree(self.repo(repo_id), ignore_errors=True)
        shutil.copytree(folder_path, self.repo(repo_id))
        files = sorted(path.name for path in self.repo(repo_id).iterdir())
        self.uploads.append({"repo_id": repo_id, "repo_type": repo_type, "message": commit_message, "files": files})
        return SimpleNamespace(commit_url=f"https://huggingface.co/datasets/{repo_id}/commit/0", oid="0")

    def snapshot_download(self, api, repo_id, repo_type=None, revision=None, allow_patterns=None, **kwargs):
        self.downloads.append(
            {"repo_id": repo_id, "repo_type": repo_type, "revision": revision, "allow_patterns": allow_patterns}
        )
        if self.offline or not self.repo(repo_id).is_dir():
            raise LocalEntryNotFoundError("not in the local cache")
        snapshot = self.directory / "snapshots" / repo_id.replace("/", "--") / FAKE_COMMIT
        snapshot.mkdir(parents=True, exist_ok=True)
        for path in self.repo(repo_id).iterdir():
            if allow_patterns is None or any(fnmatch.fnmatch(path.name, p) for p in allow_patterns):
                shutil.copyfile(path, snapshot / path.name)
        return str(snapshot)


@contextlib.contextmanager
def fake_dataset_hub(directory):
    """`HfApi.create_repo`, `upload_folder` and `snapshot_download` served by a [`FakeDatasetHub`] in `directory`
    (`huggingface_hub` objects patched, none of ours)."""
    hub = FakeDatasetHub(directory)
    with (
        mock.patch.object(HfApi, "create_repo", autospec=True, side_effect=hub.create_repo),
        mock.patch.object(HfApi, "upload_folder", autospec=True, side_effect=hub.upload_folder),
        mock.patch.object(HfApi, "snapshot_download", autospec=True, side_effect=hub.snapshot_download),
    ):
        yield hub
