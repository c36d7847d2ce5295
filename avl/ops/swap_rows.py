"""``avl::swap_rows_``: exchange pairs of cached rows in place, in every head, paying per pair.

A-VL keeps its core image rows at the front of the secondary rows, so that a core step reads one
block of rows in place (a dense run of the gathered-attention op) instead of picking scattered
rows. A refresh re-ranks the core set; the rows that leave it swap places with the rows that enter
it. Between refreshes the core changes little, so a swap moves a few rows, not the secondary set.

The op is a mutating ``torch.library.custom_op`` (one opaque node for ``torch.compile``). Its
kernel reads which pairs are set (a data-dependent count: ``nonzero``) and moves only those rows;
the fake implementation has no outputs.
"""

from __future__ import annotations

import torch


@torch.library.custom_op("avl::swap_rows_", mutates_args=("k", "v"))
def swap_rows_(k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """Swap rows ``a[s, i]`` and ``b[s, i]`` of sample s in every head of ``k`` and ``v``
    ``[B, H, N, D]``, in place. ``a``, ``b``: ``[B, P]`` int64 row numbers, ``-1`` in ``a`` where
    there is no pair; the rows named in one sample's ``a`` and ``b`` are distinct."""
    sample, pair = (a >= 0).nonzero(as_tuple=True)
    rows_a, rows_b = a[sample, pair], b[sample, pair]
    for x in (k, v):
        held_a, held_b = x[sample, :, rows_a], x[sample, :, rows_b]  # [pairs, H, D]
        x[sample, :, rows_a] = held_b
        x[sample, :, rows_b] = held_a


@swap_rows_.register_fake
def _(k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    return None
