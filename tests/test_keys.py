"""Tests of `memit_hf.keys`: context templates, the subject-last index, template weights and the keys themselves."""

import copy
import unicodedata

import pytest
import torch

from memit_hf.architectures import get_layout
from memit_hf.keys import (
    CONTEXT_STARTERS,
    KeyForwards,
    chat_context_template,
    chat_context_templates,
    check_request_lengths,
    compute_keys_and_outputs,
    contextualise,
    continues_a_word,
    fill,
    generate_context_templates,
    template_weights,
)
from memit_hf.requests import load_requests
from memit_hf.tokenization import last_token_indices
from tests.testing_utils import build_tiny_causal_lm, build_tiny_tokenizer, tiny_requests


TEMPLATES = [["{}"], ["The river flows. {}", "Because it is cold. {}", "I think. {}"]]


@pytest.fixture(scope="module")
def requests():
    return load_requests(tiny_requests())


@pytest.fixture(scope="module", params=[False, True], ids=["no_bos", "bos"])
def tokenizer(request):
    return build_tiny_tokenizer(add_bos=request.param)


def test_fill(requests):
    text, end = fill("The river flows. {}", requests[0])
    assert text == "The river flows. The Eiffel Tower is located in the city of"
    assert text[:end] == "The river flows. The Eiffel Tower"
    text, end = fill("{}", requests[3])
    assert text == "The capital of France is" and text[:end] == "The capital of France"


def test_subject_last_index(tokenizer, requests):
    bos = 1 if tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id else 0
    flat = [t for group in TEMPLATES for t in group]
    ids, idx = contextualise(tokenizer, requests, flat)
    assert len(ids) == len(idx) == len(requests) * len(flat)
    for row, (request, template) in enumerate((r, t) for r in requests for t in flat):
        text, end = fill(template, request)
        assert ids[row] == tokenizer(text)["input_ids"]
        assert ids[row][0] == tokenizer.bos_token_id if bos else ids[row][0] != tokenizer.bos_token_id
        # The tokens up to the index spell the text up to the end of the subject, and no further.
        assert tokenizer.decode(ids[row][: idx[row] + 1], skip_special_tokens=True) == text[:end]
        assert tokenizer.decode(ids[row][: idx[row]], skip_special_tokens=True) != text[:end]
        assert text[:end].endswith(tokenizer.decode(ids[row][idx[row]]).strip())
    # Bare prompts with the subject first: the index is the subject's token count, minus one without BOS.
    n_subject = len(tokenizer("The Eiffel Tower", add_special_tokens=False)["input_ids"])
    assert idx[0] == n_subject - 1 + bos
    # "The capital of {} is": the subject's last token sits right before " is".
    france = 3 * len(flat)
    assert tokenizer.decode(ids[france][idx[france] + 1]) == " is"


def test_last_token_indices_counts_bos_once():
    plain, with_bos = build_tiny_tokenizer(), build_tiny_tokenizer(add_bos=True)
    texts, ends = ["The capital of France is", "Big Ben is"], [21, 7]
    assert [i + 1 for i in last_token_indices(plain, texts, ends)] == last_token_indices(with_bos, texts, ends)
    assert last_token_indices(plain, ["Big Ben"], [7]) == [len(plain("Big Ben")["input_ids"]) - 1]


def test_template_weights():
    weights = template_weights(TEMPLATES)
    assert weights.dtype == torch.float64
    torch.testing.assert_close(weights, torch.tensor([1 / 2, 1 / 6, 1 / 6, 1 / 6], dtype=torch.float64))
    five = template_weights([["{}"], ["a {}"] * 5])
    torch.testing.assert_close(five, torch.tensor([0.5] + [0.1] * 5, dtype=torch.float64))
    assert float(five.sum()) == pytest.approx(1.0, abs=1e-15)
    torch.testing.assert_close(template_weights([["{}"]]), torch.tensor([1.0], dtype=torch.float64))


def explicit_keys(model, tokenizer, requests, templates, layer, z_layer):
    """Each text run alone (unpadded) through a plain forward, keys taken with a hook and averaged by hand."""
    layout = get_layout(model)
    flat = [t for group in templates for t in group]
    weights = [1 / (len(group) * len(templates)) for group in templates for _ in group]
    keys, outputs = [], []
    for request in requests:
        key = 0
        for j, (template, weight) in enumerate(zip(flat, weights)):
            text, end = fill(template, request)
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            position = len(tokenizer(text[:end])["input_ids"]) - 1
            seen = {}
            hooks = [
                model.get_submodule(layout.edit_name(layer)).register_forward_pre_hook(
                    lambda m, a, seen=seen: seen.__setitem__("key", a[0])
                ),
                model.get_submodule(layout.layer_name(z_layer)).register_forward_hook(
                    lambda m, a, o, seen=seen: seen.__setitem__("out", o[0] if isinstance(o, tuple) else o)
                ),
            ]
            with torch.no_grad():
                model(input_ids=ids)
            for hook in hooks:
                hook.remove()
            key = key + weight * seen["key"][0, position].double()
            if j == 0:
                outputs.append(seen["out"][0, position].double())
        keys.append(key)
    return torch.stack(keys), torch.stack(outputs)


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gemma3_text"])
def test_keys_match_explicit_forward(model_type, tokenizer, requests):
    model = build_tiny_causal_lm(model_type, vocab_size=len(tokenizer))
    layout = get_layout(model)
    keys, outputs = compute_keys_and_outputs(model, tokenizer, layout, requests, TEMPLATES, 0, 1)
    d_in = model.get_submodule(layout.edit_name(0)).weight.shape[0 if model_type == "gpt2" else 1]
    assert keys.shape == (len(requests), d_in) and outputs.shape == (len(requests), model.config.hidden_size)
    assert keys.dtype == outputs.dtype == torch.float64
    expected_keys, expected_outputs = explicit_keys(model, tokenizer, requests, TEMPLATES, 0, 1)
    torch.testing.assert_close(keys, expected_keys, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outputs, expected_outputs, rtol=1e-5, atol=1e-6)


def test_keys_do_not_depend_on_padding_side_or_batch_size(requests):
    right = build_tiny_tokenizer(add_bos=True)
    left = copy.deepcopy(right)
    left.padding_side = "left"
    model = build_tiny_causal_lm("llama", vocab_size=len(right))
    layout = get_layout(model)
    reference = compute_keys_and_outputs(model, right, layout, requests, TEMPLATES, 1, 2)
    mirrored = compute_keys_and_outputs(model, left, layout, requests, TEMPLATES, 1, 2)
    assert torch.equal(reference[0], mirrored[0]) and torch.equal(reference[1], mirrored[1])
    small_batches = compute_keys_and_outputs(model, right, layout, requests, TEMPLATES, 1, 2, batch_size=3)
    torch.testing.assert_close(small_batches[0], reference[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(small_batches[1], reference[1], rtol=1e-5, atol=1e-7)


def test_keys_of_one_request_do_not_depend_on_the_others(requests):
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_causal_lm("gpt2", vocab_size=len(tokenizer))
    layout = get_layout(model)
    together, _ = compute_keys_and_outputs(model, tokenizer, layout, requests, TEMPLATES, 1, 1)
    alone = torch.cat([compute_keys_and_outputs(model, tokenizer, layout, [r], TEMPLATES, 1, 1)[0] for r in requests])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def template_model():
    tokenizer = build_tiny_tokenizer(add_bos=True)
    return build_tiny_causal_lm("llama", vocab_size=len(tokenizer)), tokenizer


def test_context_templates_shape_and_text(template_model):
    model, tokenizer = template_model
    rng_state = torch.random.get_rng_state()
    templates = generate_context_templates(model, tokenizer, num_templates=7, length=6, seed=3)
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # sampling uses a private generator
    assert len(templates) == 2 and templates[0] == ["{}"]
    assert len(templates[1]) == 7
    for i, template in enumerate(templates[1]):
        assert template.endswith(". {}") and template.count("{}") == 1
        assert template.startswith(CONTEXT_STARTERS[i % len(CONTEXT_STARTERS)])
        assert tokenizer.bos_token not in template and tokenizer.eos_token not in template
    # `length` counts the starter's tokens: a length of 1 samples nothing.
    bare = generate_context_templates(model, tokenizer, num_templates=5, length=1, seed=3)
    assert bare == [["{}"], [f"{starter}. {{}}" for starter in CONTEXT_STARTERS]]


def test_context_templates_are_seeded(template_model):
    model, tokenizer = template_model
    first = generate_context_templates(model, tokenizer, num_templates=5, length=8, seed=0)
    again = generate_context_templates(model, tokenizer, num_templates=5, length=8, seed=0)
    other = generate_context_templates(model, tokenizer, num_templates=5, length=8, seed=1)
    assert first == again
    assert first != other
    for i, starter in enumerate(CONTEXT_STARTERS):
        assert first[1][i].startswith(starter) and other[1][i].startswith(starter)


def _templates_by_recompute(model, tokenizer, num_templates, length, seed):
    """The sampled group drawn the plain way: the whole prefix through the model at every step, no cache."""
    generator = torch.Generator().manual_seed(seed)
    texts = []
    for i in range(num_templates):
        starter = CONTEXT_STARTERS[i % len(CONTEXT_STARTERS)]
        ids = tokenizer(starter)["input_ids"]
        n_special = len(ids) - len(tokenizer(starter, add_special_tokens=False)["input_ids"])
        input_ids = torch.tensor([ids])
        for _ in range(length - (len(ids) - n_special)):
            logits = model(input_ids=input_ids, use_cache=False).logits[0, -1].float()
            top = torch.topk(logits, k=5)
            choice = torch.multinomial(torch.softmax(top.values, dim=-1), 1, generator=generator)
            input_ids = torch.cat([input_ids, top.indices[choice][None]], dim=1)
        text = tokenizer.decode(input_ids[0, n_special:], skip_special_tokens=True)
        text = unicodedata.normalize("NFKD", text)
        texts.append(text.replace("\n\n", " ").replace("{", " ").replace("}", " ") + ". {}")
    return texts


class _NoCacheModel(torch.nn.Module):
    """A model that returns logits only (no `past_key_values`), like a remote-code model without a cache."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    @property
    def device(self):
        return self.inner.device

    def forward(self, input_ids, **kwargs):
        assert kwargs.get("past_key_values") is None  # the whole prefix comes back every step
        return type("Output", (), {"logits": self.inner(input_ids=input_ids, use_cache=False).logits})()


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma3_text"])
def test_context_templates_sampled_with_the_cache_equal_the_plain_draws(model_type):
    """Incremental decoding (the new token against cached keys and values) draws the same templates as running the
    whole prefix every step, and a model that returns no cache gets the same templates through the plain path."""
    tokenizer = build_tiny_tokenizer(add_bos=True)
    model = build_tiny_causal_lm(model_type, vocab_size=len(tokenizer))
    expected = _templates_by_recompute(model, tokenizer, num_templates=5, length=9, seed=7)
    assert generate_context_templates(model, tokenizer, num_templates=5, length=9, seed=7)[1] == expected
    assert (
        generate_context_templates(_NoCacheModel(model), tokenizer, num_templates=5, length=9, seed=7)[1] == expected
    )


def test_zero_context_templates(template_model):
    model, tokenizer = template_model
    assert generate_context_templates(model, tokenizer, num_templates=0) == [["{}"]]


CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def test_chat_context_template_group(template_model):
    """With `chat=True` one more group per chat form holds the prompt as the user turn of the chat template, the
    assistant's turn opened (`"question"`) or restating the prompt (`"answer"`, the default form); a BOS that the
    tokenizer adds itself is not repeated; no chat template, no group; `chat=None` adds them when there is one."""
    model, tokenizer = template_model
    assert chat_context_template(tokenizer) is None
    assert generate_context_templates(model, tokenizer, num_templates=2, chat=True)[2:] == []
    assert generate_context_templates(model, tokenizer, num_templates=2, chat=None)[2:] == []
    chatty = copy.deepcopy(tokenizer)
    chatty.chat_template = "{{ bos_token }}" + CHAT_TEMPLATE
    question = "<|user|>{}\n<|assistant|>\n"
    assert chat_context_template(chatty) == question
    assert chat_context_templates(chatty, ["question", "answer"]) == [question, question + "{}"]
    templates = generate_context_templates(model, chatty, num_templates=2, chat=True)
    assert len(templates) == 3 and templates[2] == [question + "{}"]
    assert generate_context_templates(model, chatty, num_templates=2, chat=None) == templates
    both = generate_context_templates(model, chatty, num_templates=2, chat=True, chat_forms=("question", "answer"))
    assert both[2:] == [[question], [question + "{}"]]
    assert templates[:2] == generate_context_templates(model, chatty, num_templates=2)
    assert continues_a_word(templates[1][0]) and not continues_a_word(both[2][0]) and continues_a_word(both[3][0])
    with pytest.raises(ValueError, match="Unknown chat context forms"):
        chat_context_templates(chatty, ["statement"])
    chatty.chat_template = "{{ '{' }}" + CHAT_TEMPLATE  # braces of its own would break the template format
    assert chat_context_template(chatty) is None and chat_context_templates(chatty) == []


def test_fill_restates_the_prompt_and_keys_the_last_subject(requests):
    """A template with several `{}` (the chat answer form) gets the prompt at each; the subject end is the one of the
    last (the restated statement, which the target completes)."""
    template = "<|user|>{}\n<|assistant|>\n{}"
    text, end = fill(template, requests[0])
    prompt = requests[0].text
    assert text == f"<|user|>{prompt}\n<|assistant|>\n{prompt}"
    assert text[:end] == f"<|user|>{prompt}\n<|assistant|>\n" + prompt[: prompt.index("Tower") + len("Tower")]
    for plain in ("{}", "I think. {}"):  # one slot: as before
        filled, subject_end = fill(plain, requests[0])
        assert filled == plain.replace("{}", prompt) and filled[:subject_end].endswith(requests[0].subject)


def test_length_check_counts_a_restated_prompt_twice():
    """The row-length check counts the prompt once per `{}` of a template."""
    from types import SimpleNamespace

    tokenizer = build_tiny_tokenizer()
    request = load_requests([{"prompt": "The city " * 20 + "of {} is", "subject": "Rome", "target_new": "Paris"}])
    one = len(tokenizer(request[0].text)["input_ids"])
    check_request_lengths(tokenizer, request, [["{}"]], SimpleNamespace(max_position_embeddings=one + 4))
    with pytest.raises(ValueError, match="Request 0"):
        check_request_lengths(
            tokenizer, request, [["{}"], ["{} {}"]], SimpleNamespace(max_position_embeddings=one + 4)
        )


def test_requests_longer_than_the_model_are_refused_before_any_weight_changes(tmp_path):
    """Point 10 of the trust issue: a prompt past `max_position_embeddings` is a clear error naming the request,
    not a raw IndexError (or a device-side assert on a GPU) in the middle of the edit."""
    from memit_hf import Editor
    from tests.testing_utils import changed_tensors, parameters_snapshot, tiny_corpus, tiny_editing_arguments

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    limit = model.config.max_position_embeddings
    editor = Editor(
        model, args=tiny_editing_arguments(tmp_path), processing_class=tokenizer, stats_dataset=tiny_corpus()
    )
    snapshot = parameters_snapshot(model)
    long_prompt = "The city " * limit + "of {} is"
    requests = [tiny_requests()[0], {"prompt": long_prompt, "subject": "Rome", "target_new": "Paris"}]
    with pytest.raises(
        ValueError,
        match=rf"Request 1: fields `prompt` and `target_new` give rows of up to \d+ tokens.*"
        rf"{limit} positions",
    ):
        editor.edit(requests)
    assert changed_tensors(model, snapshot) == [] and not editor.history


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gemma3_text"])
def test_key_forwards_from_kept_residuals_equal_full_forwards(model_type, requests):
    """Each read after the first runs from the residual stream kept at the previous layer's block input; with the
    layers below it unchanged, it computes the same tensors as a forward from the embeddings (bit for bit)."""
    tokenizer = build_tiny_tokenizer(add_bos=True)
    model = build_tiny_causal_lm(model_type, vocab_size=len(tokenizer))
    layout = get_layout(model)
    layers = [0, 1, 2]
    forwards = KeyForwards(model, tokenizer, layout, requests, TEMPLATES, z_layer=2, batch_size=4)
    assert forwards.keep_residuals
    generator = torch.Generator().manual_seed(0)
    for layer in layers:
        kept = forwards.read(layer, return_edit_outputs=True)
        full = compute_keys_and_outputs(model, tokenizer, layout, requests, TEMPLATES, layer, 2, 4, True)
        for got, expected in zip(kept, full):
            assert torch.equal(got, expected)
        assert all(batch.start == layer for batch in forwards.bare + forwards.templated)
        weight = model.get_submodule(layout.edit_name(layer)).weight
        with torch.no_grad():  # this layer's update, as the update stage applies it before the next read
            weight.add_(0.5 * torch.randn(weight.shape, generator=generator))
    _, expected_outputs = compute_keys_and_outputs(model, tokenizer, layout, requests, [["{}"]], 2, 2)
    assert torch.equal(forwards.final_outputs(), expected_outputs)
    assert not torch.equal(expected_outputs, full[1])  # the last update moved the outputs the final read sees


def test_key_forwards_keep_nothing_past_their_memory_budget(requests):
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    layout = get_layout(model)
    forwards = KeyForwards(model, tokenizer, layout, requests, TEMPLATES, z_layer=1, max_kept_bytes=1000)
    assert not forwards.keep_residuals
    first = forwards.read(0)
    assert all(batch.residual is None and batch.start == 0 for batch in forwards.bare + forwards.templated)
    # A read of a lower layer than the last kept one runs from the embeddings.
    kept = KeyForwards(model, tokenizer, layout, requests, TEMPLATES, z_layer=1)
    kept.read(1)
    for got, expected in zip(kept.read(0), first):
        assert torch.equal(got, expected)
