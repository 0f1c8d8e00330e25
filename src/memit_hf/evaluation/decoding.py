"""Greedy decoding of prompts, plain or through the tokenizer's chat template: the leaf that the generative and
multi-hop families share.

[`greedy_continuations`] decodes each prompt greedily (no sampling, no beam search, no repetition penalty, whatever
the model's own generation defaults say) and returns only the newly generated text. With `chat=True` each prompt is
first sent as one user turn through the tokenizer's chat template ([`chat_texts`]), with the generation prompt of the
assistant's turn appended. This module imports no other evaluation module.
"""

from collections.abc import Sequence

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from ..tokenization import encode_texts, pad_token_id


__all__ = ["DEFAULT_CHAT_MESSAGE", "chat_texts", "greedy_continuations", "has_chat_template"]

DEFAULT_CHAT_MESSAGE = "{prompt}"
"""The default user message of the chat variants: the prompt itself."""


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether `tokenizer` has a chat template (`tokenizer.chat_template` is set)."""
    return bool(getattr(tokenizer, "chat_template", None))


def chat_texts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], message: str = DEFAULT_CHAT_MESSAGE
) -> list[str]:
    """Each prompt as a single user turn rendered by the tokenizer's chat template, ready for the assistant's answer.

    The user turn is `message.format(prompt=prompt)`; the text is
    `tokenizer.apply_chat_template([{"role": "user", "content": ...}], add_generation_prompt=True, tokenize=False)`
    (the template adds its default system turn, if it has one). Encode it with `add_special_tokens=False`: the
    template already holds the special tokens it needs.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): a tokenizer with a chat template.
        prompts (`Sequence[str]`): the prompts.
        message (`str`, *optional*, defaults to `"{prompt}"`): the user message, with `{prompt}` where the prompt
            goes, e.g. `"Complete the sentence: {prompt}"`.

    Returns:
        `list[str]`: one rendered conversation per prompt.

    Raises:
        ValueError: when the tokenizer has no chat template or `message` has no `{prompt}` field.
    """
    if not has_chat_template(tokenizer):
        raise ValueError(
            f"The tokenizer ({type(tokenizer).__name__}) has no chat template; set `tokenizer.chat_template` or use "
            "the plain (non-chat) prompts."
        )
    if "{prompt}" not in message:
        raise ValueError(f"`message` must contain a `{{prompt}}` field (got {message!r}).")
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": message.format(prompt=prompt)}], add_generation_prompt=True, tokenize=False
        )
        for prompt in prompts
    ]


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids that end an answer: the model's generation EOS ids, else the tokenizer's EOS token."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is None:
        configured = tokenizer.eos_token_id
    if configured is None:
        return []
    return [int(i) for i in configured] if isinstance(configured, (list, tuple)) else [int(configured)]


@torch.no_grad()
def greedy_continuations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 16,
    batch_size: int = 32,
    chat: bool = False,
    chat_message: str = DEFAULT_CHAT_MESSAGE,
    stop_strings: Sequence[str] | None = None,
) -> list[str]:
    """Greedy continuation of each prompt, decoded without the prompt and without special tokens.

    Plain prompts are encoded as the teacher-forced metrics encode them (with the tokenizer's special tokens, e.g. a
    BOS); chat prompts are rendered by [`chat_texts`] and encoded without adding special tokens. Prompts are sorted
    by length (longest first, ties in input order), left-padded by hand and decoded `batch_size` at a time with
    `model.generate`: greedy (`do_sample=False`, one beam, repetition penalty 1, no n-gram blocking), at most
    `max_new_tokens` tokens, stopping at the model's EOS ids (its generation config's, else the tokenizer's). The
    result is deterministic: the same prompts give the same batches, hence the same texts on the same weights. The
    model is in eval mode during the call and its previous mode is restored.

    Args:
        model (`PreTrainedModel`):
            A causal language model with `generate`.
        tokenizer (`PreTrainedTokenizerBase`):
            Its tokenizer.
        prompts (`Sequence[str]`):
            The prompts (plain text; with `chat=True`, the content of the user turn).
        max_new_tokens (`int`, *optional*, defaults to 16):
            Most tokens generated per prompt.
        batch_size (`int`, *optional*, defaults to 32):
            Prompts per `generate` call.
        chat (`bool`, *optional*, defaults to `False`):
            Send each prompt as a user turn through the chat template ([`chat_texts`]).
        chat_message (`str`, *optional*, defaults to `"{prompt}"`):
            The user message of the chat variant, with `{prompt}` where the prompt goes.
        stop_strings (`Sequence[str]`, *optional*):
            Also stop a prompt's decoding once its new text holds one of these strings (`GenerationConfig`'s
            `stop_strings`; the text then ends with it): for callers that cut the text there anyway, it saves the
            tokens after it.

    Returns:
        `list[str]`: one continuation per prompt, in input order: the generated tokens up to (not including) the
        first EOS, decoded with `skip_special_tokens=True`.

    Raises:
        ValueError: when `batch_size` or `max_new_tokens` is not positive, a prompt encodes to no token, or `chat` is
            set for a tokenizer without a chat template.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(
            f"`batch_size` and `max_new_tokens` must be positive integers (got {batch_size} and {max_new_tokens})."
        )
    prompts = list(prompts)
    if not prompts:
        return []
    if chat:
        rendered = chat_texts(tokenizer, prompts, chat_message)
        encoded = [list(ids) for ids in tokenizer(rendered, add_special_tokens=False)["input_ids"]]
    else:
        encoded = encode_texts(tokenizer, prompts)
    for prompt, ids in zip(prompts, encoded):
        if not ids:
            raise ValueError(f"The prompt {prompt!r} encodes to no token; nothing can be generated after it.")
    pad = pad_token_id(tokenizer)
    eos = _eos_ids(model, tokenizer)
    # Explicit values win over the model's own generation defaults (transformers fills only the unset fields from
    # `model.generation_config`), so this is plain greedy decoding whatever the checkpoint ships.
    config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad,
        eos_token_id=eos or None,
        stop_strings=list(stop_strings) if stop_strings else None,
    )
    extra = {"tokenizer": tokenizer} if stop_strings else {}
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    continuations = [""] * len(encoded)
    device = model.device
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in batch)
            input_ids = torch.tensor([[pad] * (width - len(encoded[i])) + encoded[i] for i in batch], device=device)
            mask = torch.tensor(
                [[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in batch], device=device
            )
            output = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config, **extra)
            for row, i in enumerate(batch):
                new_tokens = output[row, width:].tolist()
                stops = [position for position, token in enumerate(new_tokens) if token in eos]
                if stops:
                    new_tokens = new_tokens[: stops[0]]
                continuations[i] = tokenizer.decode(new_tokens, skip_special_tokens=True)
    finally:
        model.train(was_training)
    return continuations
