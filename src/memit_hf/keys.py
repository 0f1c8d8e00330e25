"""Keys: the input of the edited MLP down-projection at the subject's last token, averaged over context templates.

Also owns the context templates (algorithm.md section 2) and the subject-last index (section 1.3).
"""

import contextlib
import unicodedata
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .architectures import ModelLayout, cache_keyword, output_cache
from .requests import EditRequest
from .settings import CHAT_FORMS
from .tokenization import encode_targets, encode_texts, last_token_indices, pad_batch, pad_token_id
from .tracing import capture, first_output, run_until_stopped, skip_blocks


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
            output = model(input_ids=step_ids, use_cache=True, **{cache_keyword(model): past})
            logits = output.logits[0, -1].float().cpu()
            past = output_cache(output)
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


# Residual streams kept between the layers of one update stage: above this many bytes, every layer's keys run from
# the embeddings again (no memory held).
MAX_KEPT_RESIDUAL_BYTES = 2**31


@dataclass
class KeyBatch:
    """One batch of key rows (a template group's rows of similar length, right-padded).

    Args:
        input_ids (`torch.Tensor`), attention_mask (`torch.Tensor`): `(rows, T)` on the model's device.
        requests (`torch.Tensor`), templates (`torch.Tensor`): each row's request and flat template index.
        positions (`torch.Tensor`): each row's subject-last token.
        residual (`torch.Tensor`, *optional*): the residual stream `(rows, T, d_model)` at the input of block `start`,
            kept from the last forward.
        start (`int`): the block `residual` enters (0: none kept).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    requests: torch.Tensor
    templates: torch.Tensor
    positions: torch.Tensor
    residual: torch.Tensor | None = None
    start: int = 0


class KeyForwards:
    """The forwards of one update stage's keys: every request under every context template, tokenised and batched
    once, read layer after layer while the edited layers change.

    The bare prompts run to block `z_layer` (the outputs are measured there); the context-templated prompts only to
    the edited projection's input (their keys are all that is needed of them). Rows are batched by length, so little
    padding runs. Each read of layer `L` keeps every batch's residual stream at block `L`'s input, and the next read
    (of a higher layer, after `L`'s update) runs from block `L` on instead of from the embeddings: the blocks below
    `L` are unchanged, so it computes the same tensors (about 12 block forwards instead of 30 for layers 3-7). The
    streams are kept only while they fit in `max_kept_bytes` and the edited module lies inside its block.

    Args:
        model (`PreTrainedModel`), tokenizer (`PreTrainedTokenizerBase`), layout ([`~memit_hf.architectures.ModelLayout`]):
            the model being edited.
        requests (`list[EditRequest]`): the requests.
        templates (`list[list[str]]`): the context templates, the bare prompt `"{}"` first.
        z_layer (`int`): the block whose output is read at the bare prompts.
        batch_size (`int`, *optional*, defaults to 128): rows per forward.
        max_kept_bytes (`int`, *optional*): the most memory the kept residual streams may take (defaults to
            `MAX_KEPT_RESIDUAL_BYTES`; 0 keeps none).

    The reads must come in ascending layer order with nothing below the previous read's layer changed in between (as
    [`~memit_hf.updates.solve_layers`] does); a read of a lower layer runs from the embeddings.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        layout: ModelLayout,
        requests: list[EditRequest],
        templates: list[list[str]],
        z_layer: int,
        batch_size: int = 128,
        max_kept_bytes: int = MAX_KEPT_RESIDUAL_BYTES,
    ):
        self.model, self.layout, self.z_layer = model, layout, z_layer
        self.num_requests = len(requests)
        self.weights = template_weights(templates)
        flat = [t for group in templates for t in group]
        ids, idx = contextualise(tokenizer, requests, flat)
        per_request, pad = len(flat), pad_token_id(tokenizer)

        def batches(rows: list[int]) -> list[KeyBatch]:
            rows = sorted(rows, key=lambda row: len(ids[row]))
            made = []
            for start in range(0, len(rows), batch_size):
                batch = torch.tensor(rows[start : start + batch_size])
                input_ids, mask = pad_batch([ids[row] for row in batch], pad, model.device)
                positions = torch.tensor([idx[row] for row in batch])
                made.append(KeyBatch(input_ids, mask, batch // per_request, batch % per_request, positions))
            return made

        self.bare = batches([row for row in range(len(ids)) if row % per_request == 0])
        self.templated = batches([row for row in range(len(ids)) if row % per_request != 0])
        embeddings = model.get_input_embeddings().weight
        stream_bytes = sum(b.input_ids.numel() for b in self.bare + self.templated) * embeddings.shape[1]
        self.keep_residuals = stream_bytes * embeddings.element_size() <= max_kept_bytes
        self.container = None  # a block output, whose container type the skipped blocks return

    @torch.no_grad()
    def read(self, layer: int, return_edit_outputs: bool = False) -> tuple[torch.Tensor, ...]:
        """Keys at `layer` and the residual stream at `z_layer`, with the model's current weights.

        Returns:
            `tuple[torch.Tensor, ...]`: keys `(n, d_in)` (input of the edited projection at the subject-last token,
            averaged over templates) and outputs `(n, d_model)` (block `z_layer` output at the subject-last token of
            the bare prompt), float64 on the CPU; with `return_edit_outputs`, also the edited projection's output
            `(n, d_out)` at the subject-last token of the bare prompt.
        """
        edit_name, layer_name = self.layout.edit_name(layer), self.layout.layer_name(self.z_layer)
        names = ("in:" + edit_name, "out:" + layer_name, "out:" + edit_name)
        found: dict[str, torch.Tensor] = {}
        self._run(self.bare, layer, names, found, stop_after=layer_name)
        self._run(self.templated, layer, ("in:" + edit_name,), found, stop_before=edit_name)
        keys, outputs, edit_outputs = (found[name] for name in names)
        return (keys, outputs, edit_outputs) if return_edit_outputs else (keys, outputs)

    @torch.no_grad()
    def final_outputs(self) -> torch.Tensor:
        """The block-`z_layer` outputs `(n, d_model)` at the bare prompts' subject-last tokens, float64 on the CPU (after
        the last read, from the residual streams it kept)."""
        name = "out:" + self.layout.layer_name(self.z_layer)
        found: dict[str, torch.Tensor] = {}
        self._run(self.bare, self.z_layer, (name,), found, stop_after=self.layout.layer_name(self.z_layer))
        return found[name]

    def _run(self, batches: list[KeyBatch], layer: int, names: tuple[str, ...], found: dict, **stop) -> None:
        """Run `batches` up to `stop`, adding what `names` capture at the subject-last tokens into `found` (inputs
        weighted by template, outputs per request); keep each batch's stream at block `layer`'s input."""
        block_name = self.layout.layer_name(layer)
        keep = self.keep_residuals and self.layout.edit_name(layer).startswith(block_name + ".")
        blocks = list(self.model.get_submodule(self.layout.layers_attr))
        for batch in batches:
            inputs = [name[3:] for name in names if name.startswith("in:")] + ([block_name] if keep else [])
            outputs = [name[4:] for name in names if name.startswith("out:")]
            start = batch.start if batch.residual is not None and batch.start <= layer else 0
            with contextlib.ExitStack() as stack:
                store = stack.enter_context(capture(self.model, inputs=inputs, outputs=outputs, **stop))
                if start > 0:
                    residual = batch.residual
                    stack.enter_context(skip_blocks(blocks[:start], lambda r=residual: r, self.container))
                kept = stack.enter_context(first_output(blocks[0])) if self.container is None else None
                run_until_stopped(
                    lambda b=batch: self.model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
                )
            if kept:
                self.container = kept[0]
            if keep:
                batch.residual, batch.start = store["in:" + block_name], layer
            for name in names:
                values = at_positions(store[name], batch.positions)
                if name not in found:
                    found[name] = torch.zeros(self.num_requests, values.shape[1], dtype=torch.float64)
                if name.startswith("in:"):
                    found[name].index_add_(0, batch.requests, values * self.weights[batch.templates][:, None])
                else:
                    found[name][batch.requests] = values


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
    """Keys at `layer` and the residual stream at `z_layer`, in one read of [`KeyForwards`] (which see; it keeps
    nothing).

    Returns:
        `tuple[torch.Tensor, ...]`: keys `(n, d_in)` (input of the edited projection at the subject-last token,
        averaged over templates) and outputs `(n, d_model)` (block `z_layer` output at the subject-last token of the
        bare prompt), float64 on the CPU; with `return_edit_outputs`, also the edited projection's output `(n, d_out)`
        at the subject-last token of the bare prompt.
    """
    forwards = KeyForwards(model, tokenizer, layout, requests, templates, z_layer, batch_size, max_kept_bytes=0)
    return forwards.read(layer, return_edit_outputs)
