"""Tests of `memit_hf.tracing`: captures, early stops, additions at positions and block skipping, all of which must
leave the model exactly as they found it."""

import pytest
import torch
from torch import nn

from memit_hf.architectures import get_layout
from memit_hf.tracing import (
    StopForward,
    capture,
    hidden_of,
    run_until_stopped,
    skip_blocks,
    with_hidden,
)
from tests.testing_utils import build_tiny_causal_lm


VOCAB = 64
INPUT_IDS = torch.tensor([[5, 9, 13, 17, 21, 25], [30, 31, 32, 33, 34, 35]])


def hook_state(model: nn.Module) -> dict:
    """Every hook and instance-level forward override of every submodule."""
    return {
        name: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks), vars(m).get("forward"))
        for name, m in model.named_modules()
    }


def no_hooks(model: nn.Module) -> bool:
    """Nothing registered beyond transformers' own output-capturing hooks (installed by `output_hidden_states`)."""
    return hook_state(model) == model._baseline_hooks


@pytest.fixture(params=["gpt2", "llama"])
def model(request):
    model = build_tiny_causal_lm(request.param, vocab_size=VOCAB)
    with torch.no_grad():
        model(input_ids=INPUT_IDS, output_hidden_states=True)  # let transformers install its own hooks first
    model._baseline_hooks = hook_state(model)
    return model


def reference_states(model):
    """Block outputs (hidden_states[i + 1]) and the final logits of a plain forward."""
    with torch.no_grad():
        out = model(input_ids=INPUT_IDS, output_hidden_states=True)
    return out.hidden_states, out.logits


def test_hidden_of_and_with_hidden():
    a, b = torch.ones(2), torch.zeros(2)
    assert hidden_of(a) is a
    assert hidden_of((a, "cache")) is a
    assert with_hidden(a, b) is b
    replaced = with_hidden((a, "cache", 3), b)
    assert isinstance(replaced, tuple) and replaced[0] is b and replaced[1:] == ("cache", 3)


def test_capture_inputs_and_outputs(model):
    layout = get_layout(model)
    block, edit = layout.layer_name(1), layout.edit_name(1)
    hidden_states, logits = reference_states(model)
    mlp_inputs = {}
    handle = model.get_submodule(edit).register_forward_pre_hook(lambda m, a: mlp_inputs.__setitem__("k", a[0]))
    with torch.no_grad():
        model(input_ids=INPUT_IDS)
    handle.remove()
    with capture(model, inputs=[edit], outputs=[block]) as store, torch.no_grad():
        out = model(input_ids=INPUT_IDS)
    assert set(store) == {"in:" + edit, "out:" + block}
    torch.testing.assert_close(store["in:" + edit], mlp_inputs["k"], rtol=0, atol=0)
    if model.config.model_type == "llama":  # GPT-2's last hidden state is after ln_f, block 1 is not the last
        torch.testing.assert_close(store["out:" + block], hidden_states[2], rtol=0, atol=0)
    torch.testing.assert_close(out.logits, logits, rtol=0, atol=0)
    assert no_hooks(model)


def test_stop_after_ends_the_forward_and_cleans_up(model):
    layout = get_layout(model)
    first, second = layout.layer_name(0), layout.layer_name(1)
    hidden_states, logits = reference_states(model)
    calls = []
    later = model.get_submodule(layout.layer_name(2)).register_forward_hook(lambda *a: calls.append(1))
    with capture(model, outputs=[first], stop_after=first) as store, torch.no_grad():
        assert run_until_stopped(lambda: model(input_ids=INPUT_IDS)) is None
    later.remove()
    assert calls == []  # blocks after the stop never ran
    torch.testing.assert_close(store["out:" + first], hidden_states[1], rtol=0, atol=0)
    # A stop module that is not captured still stops.
    with capture(model, outputs=[first], stop_after=second) as store, torch.no_grad():
        with pytest.raises(StopForward):
            model(input_ids=INPUT_IDS)
    assert "out:" + first in store and "out:" + second not in store
    assert no_hooks(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=INPUT_IDS).logits, logits, rtol=0, atol=0)


def test_stop_before(model):
    layout = get_layout(model)
    edit0, edit2 = layout.edit_name(0), layout.edit_name(2)
    ran = []
    handle = model.get_submodule(edit2).register_forward_hook(lambda *a: ran.append(1))
    with capture(model, inputs=[edit0, edit2], stop_before=edit2) as store, torch.no_grad():
        run_until_stopped(lambda: model(input_ids=INPUT_IDS))
    assert set(store) == {"in:" + edit0, "in:" + edit2} and ran == []
    with capture(model, inputs=[edit0], stop_before=edit2) as store, torch.no_grad():
        run_until_stopped(lambda: model(input_ids=INPUT_IDS))
    assert set(store) == {"in:" + edit0} and ran == []
    handle.remove()
    assert no_hooks(model)


def test_capture_removes_hooks_on_error(model):
    layout = get_layout(model)
    with pytest.raises(RuntimeError, match="boom"):
        with capture(model, inputs=[layout.edit_name(0)], outputs=[layout.layer_name(1)], stop_after="lm_head"):
            raise RuntimeError("boom")
    assert no_hooks(model)


def test_run_until_stopped_passes_other_errors():
    assert run_until_stopped(lambda: 7) == 7

    def fail():
        raise KeyError("other")

    with pytest.raises(KeyError, match="other"):
        run_until_stopped(fail)


def test_skip_blocks_reproduces_the_forward_and_restores(model):
    layout = get_layout(model)
    blocks = list(model.get_submodule(layout.layers_attr))
    hidden_states, logits = reference_states(model)
    template = {}
    handle = blocks[1].register_forward_hook(lambda m, a, out: template.__setitem__("out", out))
    with torch.no_grad():
        model(input_ids=INPUT_IDS)
    handle.remove()
    calls = {"first": 0}
    counter = blocks[0].register_forward_pre_hook(lambda *a: calls.__setitem__("first", calls["first"] + 1))
    block1_output = hidden_of(template["out"])
    with skip_blocks(blocks[:2], lambda: block1_output, template["out"]), torch.no_grad():
        skipped = model(input_ids=INPUT_IDS).logits
        assert all("forward" in vars(b) for b in blocks[:2])
    counter.remove()
    torch.testing.assert_close(skipped, logits, rtol=1e-5, atol=1e-6)
    assert calls["first"] == 1  # the module is still called, but its forward does no work
    # A changed block-1 output changes the logits as a full forward with that output would.
    shifted = block1_output + 0.1
    with skip_blocks(blocks[:2], lambda: shifted, template["out"]), torch.no_grad():
        moved = model(input_ids=INPUT_IDS).logits
    assert not torch.allclose(moved, logits)
    assert no_hooks(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=INPUT_IDS).logits, logits, rtol=0, atol=0)


def test_skip_blocks_keeps_instance_forward_and_restores_on_error():
    class Block(nn.Module):
        def forward(self, hidden_states):
            return hidden_states + 1

    plain, patched = Block(), Block()

    def custom(hidden_states):
        return hidden_states * 3

    patched.forward = custom
    x = torch.ones(2)
    with pytest.raises(ValueError, match="inside"):
        with skip_blocks([plain, patched], lambda: torch.zeros(2), x):
            torch.testing.assert_close(plain(x), x)  # passthrough
            torch.testing.assert_close(patched(x), torch.zeros(2))  # last block returns last_output()
            raise ValueError("inside")
    assert "forward" not in vars(plain)
    assert patched.forward is custom
    torch.testing.assert_close(plain(x), x + 1)
    torch.testing.assert_close(patched(x), x * 3)
