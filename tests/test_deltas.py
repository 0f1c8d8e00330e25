"""Tests of `memit_hf.deltas`: low-rank factors, their application (Linear and GPT-2 Conv1D) and exact restore."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from memit_hf.deltas import LayerDelta, WeightSnapshot, add_delta, make_delta
from tests.testing_utils import build_tiny_causal_lm


D_IN, D_OUT, RANK = 12, 5, 3


def factors(seed: int = 0, d_out: int = D_OUT, d_in: int = D_IN, rank: int = RANK, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(d_out, rank, generator=generator, dtype=dtype),
        torch.randn(rank, d_in, generator=generator, dtype=dtype),
    )


class Holder(nn.Module):
    def __init__(self, module: nn.Module):
        super().__init__()
        self.proj = module


def linear() -> nn.Linear:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Linear(D_IN, D_OUT)


def conv1d() -> Conv1D:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        module = Conv1D(D_OUT, D_IN)  # weight (in, out)
        nn.init.normal_(module.weight)
        nn.init.normal_(module.bias)
    return module


@pytest.mark.parametrize("make", [linear, conv1d], ids=["linear", "conv1d"])
def test_add_delta_changes_outputs_by_delta_times_key(make):
    model = Holder(make())
    lora_B, lora_A = factors()
    delta = make_delta("proj", model.proj, lora_B, lora_A)
    assert delta.fan_in_fan_out == isinstance(model.proj, Conv1D)
    assert delta.rank == RANK
    assert delta.lora_B.dtype == delta.lora_A.dtype == torch.float32
    assert delta.dense().shape == model.proj.weight.shape
    x = torch.randn(7, D_IN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model.proj(x)
        add_delta(model, delta)
        after = model.proj(x)
    # In (out, in) convention, whatever the storage: y' - y = x (B A)^T.
    expected = x @ (delta.lora_B @ delta.lora_A).T
    torch.testing.assert_close(after - before, expected, rtol=1e-5, atol=1e-5)


def test_conv1d_dense_is_transposed():
    lora_B, lora_A = factors()
    plain = LayerDelta("m", lora_B.float(), lora_A.float(), fan_in_fan_out=False)
    flipped = LayerDelta("m", lora_B.float(), lora_A.float(), fan_in_fan_out=True)
    torch.testing.assert_close(plain.dense(), lora_B.float() @ lora_A.float(), rtol=0, atol=0)
    torch.testing.assert_close(flipped.dense(), plain.dense().T, rtol=0, atol=0)
    assert flipped.dense().shape == (D_IN, D_OUT)


def test_gpt2_c_proj_is_conv1d():
    model = build_tiny_causal_lm("gpt2", vocab_size=64)
    module = model.get_submodule("transformer.h.0.mlp.c_proj")
    d_in, d_out = module.weight.shape
    lora_B, lora_A = factors(d_out=d_out, d_in=d_in)
    delta = make_delta("transformer.h.0.mlp.c_proj", module, lora_B, lora_A)
    assert delta.fan_in_fan_out
    original = module.weight.detach().clone()
    add_delta(model, delta)
    torch.testing.assert_close(module.weight - original, (lora_B @ lora_A).T.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", [linear, conv1d], ids=["linear", "conv1d"])
@pytest.mark.parametrize(
    "b_shape, a_shape",
    [((D_OUT + 1, RANK), (RANK, D_IN)), ((D_OUT, RANK), (RANK, D_IN - 1)), ((D_OUT, RANK), (RANK + 1, D_IN))],
)
def test_make_delta_shape_errors(make, b_shape, a_shape):
    module = make()
    with pytest.raises(ValueError, match=rf"do not fit `proj` \(out={D_OUT}, in={D_IN}\)"):
        make_delta("proj", module, torch.zeros(b_shape), torch.zeros(a_shape))


def test_make_delta_rejects_transposed_factors_for_rectangular_weight():
    lora_B, lora_A = factors()
    with pytest.raises(ValueError, match="do not fit"):
        make_delta("proj", linear(), lora_A.T, lora_B.T)


def test_add_delta_respects_weight_dtype():
    module = nn.Linear(D_IN, D_OUT).to(torch.bfloat16)
    model = Holder(module)
    original = module.weight.detach().clone()
    delta = make_delta("proj", module, *factors(seed=3))
    add_delta(model, delta)
    assert module.weight.dtype == torch.bfloat16
    expected = (original.float() + delta.dense()).to(torch.bfloat16)
    assert torch.equal(module.weight, expected)


def test_snapshot_restore_is_bit_exact():
    model = build_tiny_causal_lm("llama", vocab_size=64)
    names = ["model.layers.0.mlp.down_proj", "model.layers.2.mlp.down_proj"]
    originals = {name: model.get_submodule(name).weight.detach().clone() for name in names}
    other = model.get_submodule("model.layers.1.mlp.down_proj").weight.detach().clone()
    snapshot = WeightSnapshot(model, names)
    assert names[0] in snapshot and "model.layers.1.mlp.down_proj" not in snapshot
    for i, name in enumerate(names):
        module = model.get_submodule(name)
        add_delta(model, make_delta(name, module, *factors(seed=i, d_out=32, d_in=64)))
        assert not torch.equal(module.weight, originals[name])
    snapshot.restore()
    for name in names:
        assert torch.equal(model.get_submodule(name).weight, originals[name])
    assert torch.equal(model.get_submodule("model.layers.1.mlp.down_proj").weight, other)
    # The snapshot holds copies, not views: restoring twice works after further changes.
    add_delta(model, make_delta(names[0], model.get_submodule(names[0]), *factors(seed=5, d_out=32, d_in=64)))
    snapshot.restore()
    assert torch.equal(model.get_submodule(names[0]).weight, originals[names[0]])


def test_apply_then_subtract_restores_within_float_error():
    """A delta and its negation cancel up to float32 rounding (restore() exists for bit-exactness)."""
    model = Holder(linear())
    original = model.proj.weight.detach().clone()
    lora_B, lora_A = factors(seed=4)
    add_delta(model, make_delta("proj", model.proj, lora_B, lora_A))
    add_delta(model, make_delta("proj", model.proj, -lora_B, lora_A))
    torch.testing.assert_close(model.proj.weight, original, rtol=0, atol=1e-5)
