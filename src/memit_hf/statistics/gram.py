"""The symmetric product `keys^T keys` of each batch, in float32, added to a float64 sum: only the blocks on and
above the diagonal are multiplied, and the ones below are filled once at the end."""

import torch


GRAM_BLOCKS = 4
"""Blocks per side of the symmetric product `keys^T keys`: only the `b (b + 1) / 2` blocks on and above the diagonal
are multiplied, `(b + 1) / (2 b)` of a full product's FLOPs."""


def gram_edges(dim: int, blocks: int = GRAM_BLOCKS) -> list[int]:
    """The block boundaries of a `(dim, dim)` Gram matrix split into `blocks` blocks per side."""
    return [dim * i // blocks for i in range(blocks + 1)]


def add_gram(total: torch.Tensor, keys: torch.Tensor, blocks: int = GRAM_BLOCKS, mirror: bool = True) -> None:
    """`total += keys^T keys` (float64 accumulator, float32 products), computing only the upper block triangle of
    the symmetric product.

    Args:
        total (`torch.Tensor`): `(d, d)` float64, on the device of `keys`.
        keys (`torch.Tensor`): `(tokens, d)` float32.
        blocks (`int`, *optional*, defaults to `GRAM_BLOCKS`): blocks per side.
        mirror (`bool`, *optional*, defaults to `True`): also add the transposed blocks below the diagonal. With
            `False` they are left untouched, to be filled once at the end by [`mirror_gram`]: the same result, bit
            for bit, with half the float64 additions per batch.
    """
    edges = gram_edges(keys.shape[1], blocks)
    for i in range(blocks):
        rows = slice(edges[i], edges[i + 1])
        for j in range(i, blocks):
            cols = slice(edges[j], edges[j + 1])
            block = keys[:, rows].T @ keys[:, cols]  # float32 (rows, cols)
            total[rows, cols] += block
            if mirror and i != j:
                total[cols, rows] += block.T


def mirror_gram(total: torch.Tensor, blocks: int = GRAM_BLOCKS) -> torch.Tensor:
    """Fill the blocks below the diagonal of a Gram sum accumulated with `add_gram(..., mirror=False)` with the
    transposes of those above it, in place; returns `total`."""
    edges = gram_edges(total.shape[0], blocks)
    for i in range(blocks):
        for j in range(i + 1, blocks):
            rows, cols = slice(edges[i], edges[i + 1]), slice(edges[j], edges[j + 1])
            total[cols, rows] = total[rows, cols].T
    return total
