"""Keys: the input of the edited MLP down-projection at the subject's last token, averaged over context templates.

Also owns the context templates (algorithm.md section 2) and the subject-last index (section 1.3).
"""

import unicodedata
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .architectures import ModelLayout
from .requests import EditRequest
from .settings import CHAT_FORMS
from .tokenization import encode_targets, encode_texts, last_token_indices, pad_batch, pad_token_id
from .tracing import capture, run_until_stopped


CONTEXT_STARTERS = ("The", "Therefore", "Because", "I", "You")


@torch.no_grad()
def generate_context_templates(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    num_templates: int = 5,
    length: int = 10,
    seed: int = 42,
    chat: bool | None = False,
    chat_forms: tuple[str, ...] | list[str] = ("answer",),
) -> list[list[str]]:
    """Sample the context templates `[["{}"], [t_1, ..., t_k]]` used to average keys and to optimise z; with `chat`,
    one more group per form of `chat_forms` holds the prompt inside the tokenizer's chat template
    ([`chat_context_templates`]), so the edit is also keyed and optimised where an instruct model meets it in chat use.

    Each prefix starts from one of "The", "Therefore", "Because", "I", "You" (cycled) and is sampled with top-k = 5
    up to `length` tokens in total; braces become spaces and `". {}"` is appended, as in the reference. Unlike the
    reference, sampling is seeded (a private `torch.Generator`), so templates are reproducible, and special tokens
    (a BOS string) never leak into the text.

    Args:
        model (`PreTrainedModel`), tokenizer (`PreTrainedTokenizerBase`): the (unedited) model and its tokenizer.
        num_templates (`int`, *optional*, defaults to 5): sampled prefixes.
        length (`int`, *optional*, defaults to 10): tokens per sampled prefix, its start word included.
        seed (`int`, *optional*, defaults to 42): the sampling seed.
        chat (`bool`, *optional*, defaults to `False`): add the chat groups; `None`: add them when the tokenizer has
            a chat template (with `True` too, a tokenizer without one adds none).
        chat_forms (`tuple[str, ...]`, *optional*, defaults to `("answer",)`): the chat forms, from `CHAT_FORMS`.

    Returns:
        `list[list[str]]`: the bare template group, the sampled group (when `num_templates > 0`) and one group per
        chat form.
    """
    groups = [["{}"]]
    chat_groups = (
        [[template] for template in chat_context_templates(tokenizer, chat_forms)] if chat is not False else []
    )
    if num_templates > 0:
        groups.append(_sampled_templates(model, tokenizer, num_templates, length, seed))
    return groups + chat_groups


def chat_context_templates(
    tokenizer: PreTrainedTokenizerBase, forms: tuple[str, ...] | list[str] = ("answer",)
) -> list[str]:
    """The chat context templates of `forms` (see `CHAT_FORMS`), in that order: `"question"` is
    [`chat_context_template`] (`"...user...{}...assistant..."`, the target opens the answer), `"answer"` the same
    followed by the prompt again (`"...user...{}...assistant...{}"`: the key and the delta sit at the subject of the
    restated prompt, which the target completes with a leading space). Empty when the tokenizer has no usable chat
    template.

    Raises:
        ValueError: naming a form that is not in `CHAT_FORMS`.
    """
    unknown = [form for form in forms if form not in CHAT_FORMS]
    if unknown:
        raise ValueError(f"Unknown chat context forms {unknown}; choose from {list(CHAT_FORMS)}.")
    question = chat_context_template(tokenizer)
    if question is None:
        return []
    return [question + "{}" if form == "answer" else question for form in forms]


def _sampled_templates(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, num_templates: int, length: int, seed: int
) -> list[str]:
    device = model.device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    templates = []
    for i in range(num_templates):
        starter = CONTEXT_STARTERS[i % len(CONTEXT_STARTERS)]
        ids = encode_texts(tokenizer, [starter])[0]
        n_special = len(ids) - len(tokenizer(starter, add_special_tokens=False)["input_ids"])
        input_ids = torch.tensor([ids], device=device)
        step_ids, past = input_ids, None
        for _ in range(max(0, length - (len(ids) - n_special))):
            # incremental decoding: each step runs the new token against the cached keys and values (the whole
            # prefix again only for a model that returns no cache); the seeded draws are the same either way
            output = model(input_ids=step_ids, past_key_values=past, use_cache=True)
            logits = output.logits[0, -1].float().cpu()
            past = getattr(output, "past_key_values", None)
            top = torch.topk(logits, k=min(5, logits.numel()))
            choice = torch.multinomial(torch.softmax(top.values, dim=-1), 1, generator=generator)
            next_id = top.indices[choice].to(device)
            input_ids = torch.cat([input_ids, next_id[None]], dim=1)
            step_ids = input_ids if past is None else next_id[None]
        text = tokenizer.decode(input_ids[0, n_special:], skip_special_tokens=True)
        text = unicodedata.normalize("NFKD", text).replace("\n\n", " ").replace("{", " ").replace("}", " ")
        templates.append(text + ". {}")
    return templates


def chat_context_template(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The prompt as the user turn of the tokenizer's chat template with the assistant's turn opened, as a context
    template (`"...user...{}...assistant..."`); `None` when the tokenizer has no chat template (or its rendering
    holds braces of its own). A BOS token that the tokenizer adds by itself is not repeated in the text."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "\x00PROMPT\x00"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": marker}], add_generation_prompt=True, tokenize=False
    )
    if "{" in text or "}" in text or text.count(marker) != 1:
        return None
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and encode_texts(tokenizer, [""])[0][:1] == [tokenizer.bos_token_id]:
        text = text[len(bos) :]
    return text.replace(marker, "{}")


def continues_a_word(template: str) -> bool:
    """Whether a target after this template continues the text on the same line (it then starts with a space, as
    the reference encodes targets), rather than opening a new turn or line (a chat answer: no leading space)."""
    return not template.endswith(("\n", " "))


def fill(template: str, request: EditRequest) -> tuple[str, int]:
    """`template` with the request's prompt (subject filled in) at every `{}`, and the character end of the subject
    in the last one: a template may restate the prompt (a chat answer that repeats the question's statement), and
    the key is read where the statement is completed."""
    text = request.text
    pieces = template.split("{}")
    filled = text.join(pieces)
    end = len(filled) - len(pieces[-1]) - len(text) + request.prompt.index("{}") + len(request.subject)
    return filled, end


def contextualise(
    tokenizer: PreTrainedTokenizerBase, requests: list[EditRequest], templates: list[str]
) -> tuple[list[list[int]], list[int]]:
    """Token ids of every (request, template) text, request-major, and the subject-last index in each."""
    texts, ends = zip(*(fill(t, r) for r in requests for t in templates))
    return encode_texts(tokenizer, list(texts)), last_token_indices(tokenizer, list(texts), list(ends))


def check_request_tokens(tokenizer: PreTrainedTokenizerBase, requests: list[EditRequest]) -> None:
    """The tokenisation checks that must pass before any weight changes: every `target_new` encodes to at least one
    token, and every subject that does not open its prompt has tokens of its own (so its last token is a key).

    Raises:
        ValueError: naming the request (its record index) and the field.
    """
    targets = encode_targets(tokenizer, [r.target_new for r in requests])
    texts_ends = [fill("{}", r) for r in requests]
    prefixes = [t[: e - len(r.subject)].rstrip() for (t, e), r in zip(texts_ends, requests)]
    prefix_lengths = [len(ids) for ids in encode_texts(tokenizer, prefixes)]
    subject_lengths = [len(ids) for ids in encode_texts(tokenizer, [t[:e] for t, e in texts_ends])]
    for request, target, before, through in zip(requests, targets, prefix_lengths, subject_lengths):
        if not target:
            raise ValueError(
                f"Request {request.record_index}: field `target_new` ({request.target_new!r}) encodes to no token."
            )
        if through <= before and request.prompt.index("{}") > 0:
            raise ValueError(
                f"Request {request.record_index}: field `subject` ({request.subject!r}) is not found as its own "
                f"tokens in the prompt {request.text!r}."
            )


def check_request_lengths(
    tokenizer: PreTrainedTokenizerBase, requests: list[EditRequest], templates: list[list[str]], config: Any
) -> None:
    """Refuse requests whose longest row (the longest context template, the prompt and the target) does not fit the
    model's positions, before any weight changes (it would fail with a raw index error, or a device-side assert on a
    GPU). Models without `max_position_embeddings` are not checked.

    Raises:
        ValueError: naming the request (its record index), its length in tokens and the model's limit.
    """
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int) or limit <= 0 or not requests:
        return
    flat = [template for group in templates for template in group] or ["{}"]
    lengths = [len(ids) for ids in encode_texts(tokenizer, [t.replace("{}", "") for t in flat])]
    slots = [max(1, t.count("{}")) for t in flat]  # a chat answer template restates the prompt
    prompts = encode_texts(tokenizer, [request.text for request in requests])
    targets = encode_targets(tokenizer, [request.target_new for request in requests])
    for request, prompt, target in zip(requests, prompts, targets):
        length = max(n + k * len(prompt) for n, k in zip(lengths, slots)) + len(target)
        if length > limit:
            raise ValueError(
                f"Request {request.record_index}: fields `prompt` and `target_new` give rows of up to {length} tokens "
                f"with the context templates, more than the model's {limit} positions (`max_position_embeddings`)."
            )


def at_positions(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """`hidden[i, positions[i]]` of a captured `(rows, seq, d)` tensor, as float64 on the CPU; the indices follow the
    tensor to its device (a model dispatched over several devices)."""
    rows = torch.arange(len(positions), device=hidden.device)
    return hidden[rows, positions.to(hidden.device)].double().cpu()


def template_weights(templates: list[list[str]]) -> torch.Tensor:
    """Weights averaging keys within each template group, then across groups (bare prompt 1/2, prefixes 1/2k)."""
    weights = [1.0 / (len(group) * len(templates)) for group in templates for _ in group]
    return torch.tensor(weights, dtype=torch.float64)


@torch.no_grad()
def compute_keys_and_outputs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    layout: ModelLayout,
    requests: list[EditRequest],
    templates: list[list[str]],
    layer: int,
    z_layer: int,
    batch_size: int = 128,
    return_edit_outputs: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Keys at `layer` and the residual stream at `z_layer`. The bare prompts run to block `z_layer` (the outputs are
    measured there); the context-templated prompts only to the edited projection's input (their keys are all that
    is needed of them). Rows are batched by length, so little padding runs.

    Returns:
        `tuple[torch.Tensor, ...]`: keys `(n, d_in)` (input of the edited projection at the subject-last token,
        averaged over templates) and outputs `(n, d_model)` (block `z_layer` output at the subject-last token of the
        bare prompt), float64 on the CPU; with `return_edit_outputs`, also the edited projection's output `(n, d_out)`
        at the subject-last token of the bare prompt.
    """
    flat = [t for group in templates for t in group]
    ids, idx = contextualise(tokenizer, requests, flat)
    weights = template_weights(templates)
    edit_name, layer_name = layout.edit_name(layer), layout.layer_name(z_layer)
    pad = pad_token_id(tokenizer)
    n, per_request = len(requests), len(flat)
    # Accumulated batch by batch: memory (n, d) whatever the number of templates, not (n * templates, d).
    found: dict[str, torch.Tensor] = {}

    def run(rows: list[int], names: tuple[str, ...], **stop) -> None:
        rows = sorted(rows, key=lambda row: len(ids[row]))
        for start in range(0, len(rows), batch_size):
            batch = torch.tensor(rows[start : start + batch_size])
            input_ids, mask = pad_batch([ids[row] for row in batch], pad, model.device)
            with capture(model, inputs=[edit_name], outputs=[edit_name, layer_name], **stop) as store:
                run_until_stopped(lambda i=input_ids, m=mask: model(input_ids=i, attention_mask=m, use_cache=False))
            request, template = batch // per_request, batch % per_request
            positions = torch.tensor([idx[row] for row in batch])
            for name in names:
                values = at_positions(store[name], positions)
                if name not in found:
                    found[name] = torch.zeros(n, values.shape[1], dtype=torch.float64)
                if name.startswith("in:"):
                    found[name].index_add_(0, request, values * weights[template][:, None])
                else:
                    found[name][request] = values

    bare = [row for row in range(len(ids)) if row % per_request == 0]  # the bare prompt "{}" is the first template
    run(bare, ("in:" + edit_name, "out:" + layer_name, "out:" + edit_name), stop_after=layer_name)
    templated = [row for row in range(len(ids)) if row % per_request != 0]
    if templated:
        run(templated, ("in:" + edit_name,), stop_before=edit_name)
    keys, outputs, edit_outputs = (
        found[name] for name in ("in:" + edit_name, "out:" + layer_name, "out:" + edit_name)
    )
    if return_edit_outputs:
        return keys, outputs, edit_outputs
    return keys, outputs
