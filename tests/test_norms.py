"""Tests of `memit_hf.norms`: the closest point of the RMS norm's output ellipsoid, and the residual mapping through
a post-MLP norm (exact when reachable, bounded and direction-preserving when not, robust to near-zero gains)."""

import pytest
import torch
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

from memit_hf.norms import closest_unit_rms, rms_norm_residuals


def gemma_norm(gain: torch.Tensor) -> Gemma3RMSNorm:
    norm = Gemma3RMSNorm(gain.shape[0], eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(gain - 1)  # Gemma stores the gain as 1 + weight
    return norm.double().requires_grad_(False)


def test_closest_unit_rms_reachable_target_is_exact():
    generator = torch.Generator().manual_seed(0)
    gain = torch.rand(16, generator=generator, dtype=torch.float64) + 0.5
    u = torch.randn(5, 16, generator=generator, dtype=torch.float64)
    u = u / u.pow(2).mean(dim=1, keepdim=True).sqrt()
    found = closest_unit_rms(gain, gain * u)
    torch.testing.assert_close(found, u, rtol=0, atol=1e-9)


def test_closest_unit_rms_is_the_constrained_minimum():
    """Against the Lagrange conditions and random feasible points (with one gain almost zero)."""
    generator = torch.Generator().manual_seed(1)
    gain = torch.rand(12, generator=generator, dtype=torch.float64) * 3
    gain[3] = 1e-7
    targets = (
        torch.randn(6, 12, generator=generator, dtype=torch.float64)
        * torch.tensor([0.1, 1, 3, 10, 100, 1e4])[:, None].double()
    )
    found = closest_unit_rms(gain, targets)
    torch.testing.assert_close(found.pow(2).mean(dim=1), torch.ones(6, dtype=torch.float64), rtol=0, atol=1e-9)
    best = (gain * found - targets).norm(dim=1)
    for _ in range(200):
        trial = found + 0.05 * torch.randn(found.shape, generator=generator, dtype=torch.float64)
        trial = trial / trial.pow(2).mean(dim=1, keepdim=True).sqrt()
        assert ((gain * trial - targets).norm(dim=1) >= best - 1e-9).all()
    # Outside the ellipsoid a dead coordinate is useless; inside it, it is where unit RMS costs the least error.
    assert found[3:, 3].abs().max() < 1e-3 and found[0, 3].abs() > 1


@pytest.mark.parametrize("scale", [0.01, 1.0])
def test_residual_mapping_is_exact_when_reachable(scale):
    generator = torch.Generator().manual_seed(2)
    gain = torch.rand(32, generator=generator, dtype=torch.float64) + 0.2
    norm = gemma_norm(gain)
    m = torch.randn(4, 32, generator=generator, dtype=torch.float64)
    # a reachable wanted output: the image of another direction
    other = m + scale * torch.randn(4, 32, generator=generator, dtype=torch.float64)
    residuals = norm(other) - norm(m)
    change = rms_norm_residuals(norm, residuals, m)
    torch.testing.assert_close(norm(m + change) - norm(m), residuals, rtol=0, atol=1e-6 * float(norm(m).abs().max()))


def test_residual_mapping_is_bounded_with_dead_gains():
    """A first-order inverse divides by the gain: with near-zero gains it asks for enormous changes. The mapping
    keeps the change in proportion to the wanted one and delivers part of the wanted residual, never the opposite."""
    generator = torch.Generator().manual_seed(3)
    gain = torch.rand(64, generator=generator, dtype=torch.float64) * 5
    gain[:8] = 0.0
    norm = gemma_norm(gain)
    m = torch.randn(6, 64, generator=generator, dtype=torch.float64) * 0.1
    residuals = torch.randn(6, 64, generator=generator, dtype=torch.float64) * 50  # far beyond the norm's range
    change = rms_norm_residuals(norm, residuals, m)
    assert torch.isfinite(change).all()
    ratio = residuals.norm(dim=1) / norm(m).norm(dim=1)
    assert (change.norm(dim=1) <= 2 * (ratio + 1) * m.norm(dim=1)).all()
    delivered = norm(m + change) - norm(m)
    assert ((delivered * residuals).sum(dim=1) > 0).all()  # towards the wanted change
    assert ((delivered - residuals).norm(dim=1) < residuals.norm(dim=1)).all()
