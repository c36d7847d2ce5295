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


CHUNK_ROWS = 4096  # head-rows moved per pass: small temporaries, reused by the allocator


@torch.library.custom_op("avl::swap_rows_", mutates_args=("k", "v"))
def swap_rows_(k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """Swap rows ``a[s, i]`` and ``b[s, i]`` of sample s in every head of ``k`` and ``v``
    ``[B, H, N, D]``, in place. ``a``, ``b``: ``[B, P]`` int64 row numbers, ``-1`` in ``a`` where
    there is no pair; the rows named in one sample's ``a`` and ``b`` are distinct."""
    sample, pair = (a >= 0).nonzero(as_tuple=True)
    for x in (k, v):
        if not x.is_contiguous():
            rows_a, rows_b = a[sample, pair], b[sample, pair]
            held_a, held_b = x[sample, :, rows_a], x[sample, :, rows_b]  # [pairs, H, D]
            x[sample, :, rows_a] = held_b
            x[sample, :, rows_b] = held_a
            continue
        # contiguous: rows of a [B * H * N, D] view, moved by index_select / index_copy_ (whole rows,
        # several times faster on CPU than indexing [B, H, N, D] with a slice between the indices),
        # in chunks: every row named once, so a chunk's reads never see another chunk's writes
        heads, n = x.shape[1], x.shape[2]
        first = ((sample * heads)[:, None] + torch.arange(heads, device=a.device)) * n  # [pairs, H]
        flat_a, flat_b = ((first + slots[sample, pair][:, None]).flatten() for slots in (a, b))
        rows = x.view(-1, x.shape[-1])
        for start in range(0, flat_a.numel(), CHUNK_ROWS):
            chunk_a, chunk_b = flat_a[start:start + CHUNK_ROWS], flat_b[start:start + CHUNK_ROWS]
            held_a, held_b = rows.index_select(0, chunk_a), rows.index_select(0, chunk_b)
            rows.index_copy_(0, chunk_a, held_b)
            rows.index_copy_(0, chunk_b, held_a)


@swap_rows_.register_fake
def _(k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    return None
