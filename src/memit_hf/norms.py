"""Residuals through an RMS norm that sits between the edited projection and the residual stream (Gemma 2/3, OLMo 2).

There the block adds `norm(m) = g * m / rms(m)` to the residual stream, not the projection's output `m` itself. A
wanted change `r` of the block output is therefore a wanted change of `norm(m)`, and the outputs `norm` can produce are
`{g * u : mean(u^2) = 1}` (it ignores the scale of `m`), an ellipsoid. [`rms_norm_residuals`] maps `r` to the change of
`m` whose normalised output is the point of that ellipsoid closest to `norm(m) + r`: exact when `norm(m) + r` is
reachable, the best reachable output otherwise. A first-order inverse (`r * rms(m) / g`) instead divides by gains
that can be near zero and asks for changes far outside the norm's linear range; on Gemma 3 270M, whose MLP outputs
are two to three orders of magnitude smaller than the residual stream, that destroyed the edit.
"""

import torch


def closest_unit_rms(gain: torch.Tensor, target: torch.Tensor, iterations: int = 200) -> torch.Tensor:
    """Per row, `u` minimising `||gain * u - target||` subject to `mean(u^2) = 1`.

    The Lagrange condition gives `u_j = g_j t_j / (g_j^2 + lam)`, with the multiplier `lam > -min g_j^2` (over the
    coordinates where `g_j t_j != 0`) set so that `mean(u^2) = 1`; `mean(u^2)` decreases in `lam`, so a bisection per
    row finds it. Rows where `gain * target` is zero return zeros.

    Args:
        gain (`torch.Tensor`): `(d,)` the norm's effective per-coordinate gain.
        target (`torch.Tensor`): `(n, d)` wanted outputs.
        iterations (`int`, *optional*, defaults to 200): bisection steps (float64 converges well before).

    Returns:
        `torch.Tensor`: `(n, d)` float64.
    """
    g = gain.double().unsqueeze(0)
    t = target.double()
    numerator = g * t  # (n, d)
    d = t.shape[1]
    active = numerator != 0
    g2 = (g * g).expand_as(t)
    lower = torch.where(active, -g2, torch.full_like(t, -torch.inf)).amax(dim=1)  # lam must stay above this
    upper = numerator.pow(2).sum(dim=1).div(d).sqrt()  # mean(u^2) <= mean(numerator^2) / lam^2 <= 1 there
    upper = torch.maximum(upper, lower.clamp_min(0)) + 1e-12
    lo, hi = lower.clone(), upper.clone()

    def mean_square(lam: torch.Tensor) -> torch.Tensor:
        return (numerator / (g2 + lam[:, None])).where(active, torch.zeros_like(t)).pow(2).mean(dim=1)

    for _ in range(iterations):
        mid = (lo + hi) / 2
        too_big = mean_square(mid) > 1
        lo = torch.where(too_big, mid, lo)
        hi = torch.where(too_big, hi, mid)
    lam = hi  # mean(u^2) <= 1 on this side, and within float64 resolution of 1
    u = (numerator / (g2 + lam[:, None])).where(active, torch.zeros_like(t))
    scale = u.pow(2).mean(dim=1, keepdim=True).sqrt()
    return torch.where(scale > 0, u / scale.clamp_min(1e-300), u)


@torch.no_grad()
def rms_norm_residuals(norm: torch.nn.Module, residuals: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """The change of the projection's outputs `m` that moves `norm(m)` by `residuals`, as closely as `norm` allows.

    With `o = norm(m)` and `u` the unit-RMS point whose image `g * u` is closest to `o + r` ([`closest_unit_rms`]),
    the new output is `s u` with the scale `s > 0` that makes the change smallest (`s = <u, m> / <u, u>`, at least
    a tenth of `rms(m)`: the norm ignores the scale, so the smallest change is preferred).

    Args:
        norm (`torch.nn.Module`): the RMS norm (any implementation: its gain is read as `norm(ones)`).
        residuals (`torch.Tensor`): `(n, d)` wanted change of the norm's output.
        outputs (`torch.Tensor`): `(n, d)` current projection outputs `m`.

    Returns:
        `torch.Tensor`: `(n, d)` float64 change of `m`.
    """
    weight = next(norm.parameters())
    m = outputs.double()
    ones = torch.ones(1, m.shape[1], dtype=weight.dtype, device=weight.device)
    gain = norm(ones).double().cpu()[0] * (1 + _eps(norm)) ** 0.5  # norm(1) = g / sqrt(1 + eps)
    current = norm(outputs.to(dtype=weight.dtype, device=weight.device)).double().cpu()
    u = closest_unit_rms(gain, current + residuals.double().cpu())
    rms = m.pow(2).mean(dim=1, keepdim=True).sqrt()
    wanted = current + residuals.double().cpu()
    # The norm ignores the scale of m, but the solve only delivers part of each asked change: asking for a change in
    # proportion to how far the wanted output is from the current one keeps the delivered direction close to u.
    ratio = (wanted.norm(dim=1, keepdim=True) / current.norm(dim=1, keepdim=True).clamp_min(1e-300)).clamp_min(1.0)
    smallest = (u * m).sum(dim=1, keepdim=True) / u.pow(2).sum(dim=1, keepdim=True).clamp_min(1e-300)
    scale = torch.maximum(smallest, rms * ratio)
    return (scale * u - m).to(residuals.device)


def _eps(norm: torch.nn.Module) -> float:
    return float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6)))
