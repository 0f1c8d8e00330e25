"""Norm-Anchor Scaling (NAS, Liu et al. 2026, https://huggingface.co/papers/2602.02543): the value vectors of a long
sequence of edits rescaled to a norm of the original model.

Edit after edit, solved value vectors and the edited weights can amplify each other (a larger weight gives larger
hidden states, whose targets ask for a larger weight). NAS breaks that loop at the value: the value vector of a
request, `v* = v0 + delta` (`v0`: the edited projection's output at the subject's last token of the bare prompt at the
z layer; `delta`: the z optimisation's change of the block output there), is rescaled to the original model's mean
`||v*||`, and a request whose `||v*||` exceeds twice that mean is left unchanged by the edit (`v* = v0`). The target of
the block output becomes `z = h - v0 + v*`. As in the reference (SasyaTitech/NAS `compute_z.py`, `vstar_stats.py`), the
anchor is the mean `||v*||` of requests solved on the original model, the norms above their 95 % quantile dropped.
"""

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .architectures import ModelLayout
from .keys import compute_keys_and_outputs
from .requests import EditRequest


def value_vectors(targets: torch.Tensor, initial: torch.Tensor, projection_outputs: torch.Tensor) -> torch.Tensor:
    """`v* = v0 + delta` of every request.

    Args:
        targets (`torch.Tensor`): `(n, d_model)` the solved targets `z = h + delta`.
        initial (`torch.Tensor`): `(n, d_model)` the block outputs `h`.
        projection_outputs (`torch.Tensor`): `(n, d_model)` `v0`, the edited projection's output at the z layer.

    Returns:
        `torch.Tensor`: `(n, d_model)` float64.
    """
    return projection_outputs.double() + (targets.double() - initial.double())


def mean_value_norm(
    targets: torch.Tensor, initial: torch.Tensor, projection_outputs: torch.Tensor, upper_quantile: float = 0.95
) -> float:
    """The NAS anchor: the mean `||v*||` of the requests (see [`value_vectors`]), the norms above their
    `upper_quantile` quantile dropped.

    Raises:
        ValueError: when `upper_quantile` is not in (0, 1].
    """
    if not 0 < upper_quantile <= 1:
        raise ValueError(f"`upper_quantile` must be in (0, 1], got {upper_quantile}.")
    norms = value_vectors(targets, initial, projection_outputs).norm(dim=1)
    return float(norms[norms <= torch.quantile(norms, upper_quantile)].mean())


def anchor_value_norms(
    targets: torch.Tensor,
    initial: torch.Tensor,
    projection_outputs: torch.Tensor,
    anchor: float,
    skip: float | None = 2.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The targets with every value vector rescaled to `anchor` (NAS).

    Args:
        targets, initial, projection_outputs: as in [`value_vectors`].
        anchor (`float`): the reference norm.
        skip (`float`, *optional*, defaults to `2.0`): a request with `||v*|| > skip * anchor` keeps `v* = v0` (its
            target is its current block output `h`, exactly); `None`: every request is rescaled.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: the new targets `z = h - v0 + v*` (dtype of `targets`) and `(n,)`
        `||v*|| / anchor` before rescaling (float32).
    """
    v0 = projection_outputs.double()
    v_star = value_vectors(targets, initial, v0)
    norms = v_star.norm(dim=1)
    scaled = v_star * (anchor / norms.clamp_min(1e-12))[:, None]
    ratio = norms / anchor
    anchored = (initial.double() - v0 + scaled).to(targets.dtype)
    if skip is not None:
        skipped = ratio > skip
        anchored[skipped] = initial[skipped].to(anchored.dtype)  # v* = v0: z = h, exactly
    return anchored, ratio.float()


def projection_outputs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    layout: ModelLayout,
    requests: list[EditRequest],
    z_layer: int,
) -> torch.Tensor:
    """`v0` of every request: the edited projection's output at block `z_layer` at the subject's last token of the
    bare prompt, `(n, d_model)` float64.

    Raises:
        ValueError: for an architecture whose projection output passes a norm before it joins the residual stream
            (Gemma 2/3, OLMo 2): there `v0` is not a part of the block output and NAS does not apply.
    """
    if layout.post_mlp_norm_template is not None:
        raise ValueError(
            "`v_norm_anchor` (NAS) needs the edited projection's output to join the residual stream directly; this "
            f"architecture normalises it first (`{layout.post_mlp_norm_template}`)."
        )
    outputs = compute_keys_and_outputs(
        model, tokenizer, layout, requests, [["{}"]], z_layer, z_layer, return_edit_outputs=True
    )
    return outputs[2]
