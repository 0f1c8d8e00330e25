"""Tests of `memit_hf.evaluation.decoding`: chat rendering and batched greedy decoding."""

import pytest
import torch

from memit_hf.evaluation.decoding import chat_texts, greedy_continuations, has_chat_template
from tests.testing_utils import (
    build_tiny_causal_lm,
    build_tiny_chat_tokenizer,
    build_tiny_tokenizer,
    scripted_lm,
)


def test_chat_texts_render_one_user_turn_with_the_generation_prompt():
    tokenizer = build_tiny_chat_tokenizer()
    assert has_chat_template(tokenizer) and not has_chat_template(build_tiny_tokenizer())
    assert chat_texts(tokenizer, ["Angola is located in", "Ghana is in"]) == [
        "<s>user: Angola is located in\n<s>assistant:",
        "<s>user: Ghana is in\n<s>assistant:",
    ]
    assert chat_texts(tokenizer, ["Ghana is in"], message="Complete: {prompt} ...") == [
        "<s>user: Complete: Ghana is in ...\n<s>assistant:"
    ]
    with pytest.raises(ValueError, match="no chat template"):
        chat_texts(build_tiny_tokenizer(), ["Ghana is in"])
    with pytest.raises(ValueError, match="`\\{prompt\\}` field"):
        chat_texts(tokenizer, ["Ghana is in"], message="Complete the sentence")


@pytest.mark.parametrize("add_bos", [False, True])
def test_greedy_continuations_follow_the_script_in_input_order(add_bos):
    tokenizer = build_tiny_tokenizer(add_bos=add_bos)
    script = {
        "The Eiffel Tower is located in the city of": " Rome, of course.",
        "I think": " the weather is cold",
        "Big Ben is located in the city of": " London",
    }
    model = scripted_lm(tokenizer, script)
    prompts = [
        "I think",
        "The Eiffel Tower is located in the city of",
        "Unscripted",
        "Big Ben is located in the city of",
    ]
    # Batches of two mix prompts of different lengths, so rows are left-padded; EOS ends each answer early.
    assert greedy_continuations(model, tokenizer, prompts, batch_size=2) == [
        " the weather is cold",
        " Rome, of course.",
        "",
        " London",
    ]
    assert greedy_continuations(model, tokenizer, prompts[:2], max_new_tokens=2, batch_size=1) == [
        tokenizer.decode(tokenizer(" the weather is cold", add_special_tokens=False)["input_ids"][:2]),
        tokenizer.decode(tokenizer(" Rome, of course.", add_special_tokens=False)["input_ids"][:2]),
    ]
    assert greedy_continuations(model, tokenizer, []) == []


def test_greedy_continuations_through_the_chat_template():
    tokenizer = build_tiny_chat_tokenizer()
    model = scripted_lm(
        tokenizer,
        {"The capital of France is": " Paris"},
        chat={"The capital of France is": "It is Paris.", "Complete: The capital of France is": "Paris."},
    )
    prompts = ["The capital of France is"]
    assert greedy_continuations(model, tokenizer, prompts) == [" Paris"]
    assert greedy_continuations(model, tokenizer, prompts, chat=True) == ["It is Paris."]
    assert greedy_continuations(model, tokenizer, prompts, chat=True, chat_message="Complete: {prompt}") == ["Paris."]
    with pytest.raises(ValueError, match="no chat template"):
        greedy_continuations(model, build_tiny_tokenizer(), prompts, chat=True)


def _greedy_one_by_one(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Unbatched, unpadded greedy decoding written out: append the argmax `max_new_tokens` times."""
    ids = tokenizer(prompt)["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_greedy_continuations_match_unbatched_greedy_decoding_on_a_real_model(model_type):
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_causal_lm(model_type, vocab_size=len(tokenizer))
    # Sampling defaults shipped with a checkpoint must not leak into the greedy decoding.
    model.generation_config.do_sample = True
    model.generation_config.top_k = 3
    model.generation_config.repetition_penalty = 1.5
    prompts = ["The Eiffel Tower is located in the city of", "I think", "Lionel Messi plays the sport of", "Rome"]
    expected = [_greedy_one_by_one(model, tokenizer, prompt, 6) for prompt in prompts]
    assert len(set(expected)) > 1  # the prompts give different texts: the order is checked too
    model.train()
    assert greedy_continuations(model, tokenizer, prompts, max_new_tokens=6, batch_size=3) == expected
    assert model.training  # mode restored


def test_stop_strings_end_each_text_at_its_first_stop_and_keep_what_comes_before():
    """With `stop_strings`, each continuation is the one decoded without them, cut just after the first stop string
    (or the whole of it when none occurs): the wild family's early stop changes no answer."""
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    prompts = ["The Eiffel Tower is located in the city of", "I think", "Lionel Messi plays the sport of", "Rome"]
    full = greedy_continuations(model, tokenizer, prompts, max_new_tokens=24, batch_size=3)
    stops = sorted({text[len(text) // 3 : len(text) // 3 + 2] for text in full if len(text) > 6})[:2]
    assert stops  # two-character pieces of the texts themselves, so that some decodings do stop early
    stopped = greedy_continuations(model, tokenizer, prompts, max_new_tokens=24, batch_size=3, stop_strings=stops)
    assert any(len(s) < len(f) for s, f in zip(stopped, full))
    for short, text in zip(stopped, full):
        assert text.startswith(short)
        ends = [text.find(stop) + len(stop) for stop in stops if stop in text]
        assert len(short) >= (min(ends) if ends else len(text))  # nothing before the first stop is lost


def test_greedy_continuations_validate():
    tokenizer = build_tiny_tokenizer()
    model = scripted_lm(tokenizer, {})
    with pytest.raises(ValueError, match="positive"):
        greedy_continuations(model, tokenizer, ["I think"], batch_size=0)
    with pytest.raises(ValueError, match="positive"):
        greedy_continuations(model, tokenizer, ["I think"], max_new_tokens=0)
    with pytest.raises(ValueError, match="encodes to no token"):
        greedy_continuations(model, tokenizer, [""])
