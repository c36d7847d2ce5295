"""`avl::swap_rows_`: in-place row swaps against a naive per-pair reference, opcheck and compile."""

from __future__ import annotations

import torch

from avl.ops import swap_rows_


def pairs(batch: int, rows: int, width: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, a random count of disjoint (a, b) row pairs; -1 pads a (and b) after them."""
    a = torch.full((batch, width), -1, dtype=torch.long)
    b = torch.full((batch, width), -1, dtype=torch.long)
    for s in range(batch):
        count = int(torch.randint(0, width + 1, (1,), generator=g))
        chosen = torch.randperm(rows, generator=g)[:2 * count]
        a[s, :count], b[s, :count] = chosen[:count], chosen[count:]
    return a, b


def naive_swap(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    out = x.clone()
    for s in range(a.shape[0]):
        for i in range(a.shape[1]):
            if a[s, i] >= 0:
                ra, rb = int(a[s, i]), int(b[s, i])
                out[s, :, ra], out[s, :, rb] = x[s, :, rb], x[s, :, ra]
    return out


def test_swaps_every_listed_pair_in_every_head_and_nothing_else():
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        k, v = torch.randn(2, 3, 4, 20, 8, generator=g).to(dtype)
        a, b = pairs(3, 20, 6, g)
        expected_k, expected_v = naive_swap(k, a, b), naive_swap(v, a, b)
        swap_rows_(k, v, a, b)
        assert torch.equal(k, expected_k) and torch.equal(v, expected_v)


def test_chunked_and_strided_caches_swap_the_same(monkeypatch):
    """Contiguous caches move rows chunk by chunk (a small chunk here, so that a swap spans many);
    a strided cache (heads not outermost in memory) takes the indexing path."""
    import avl.ops.swap_rows

    monkeypatch.setattr(avl.ops.swap_rows, "CHUNK_ROWS", 5)
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(2, 3, 4, 30, 8, generator=g)
    a, b = pairs(3, 30, 12, g)
    expected = naive_swap(k, a, b), naive_swap(v, a, b)
    swap_rows_(k, v, a, b)
    assert torch.equal(k, expected[0]) and torch.equal(v, expected[1])
    k, v = torch.randn(2, 3, 30, 4, 8, generator=g).transpose(2, 3)  # [B, H, N, D] views, not contiguous
    assert not k.is_contiguous()
    expected = naive_swap(k, a, b), naive_swap(v, a, b)
    swap_rows_(k, v, a, b)
    assert torch.equal(k, expected[0]) and torch.equal(v, expected[1])


def test_no_pairs_leave_the_cache_unchanged():
    k, v = torch.randn(2, 2, 2, 5, 4)
    before = k.clone(), v.clone()
    none = torch.full((2, 3), -1, dtype=torch.long)
    swap_rows_(k, v, none, none)
    assert torch.equal(k, before[0]) and torch.equal(v, before[1])


def test_opcheck():
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(2, 2, 3, 12, 4, generator=g)
    a, b = pairs(2, 12, 4, g)
    torch.library.opcheck(torch.ops.avl.swap_rows_.default, (k, v, a, b))


def test_compiles_in_one_graph_and_mutates_its_inputs():
    g = torch.Generator().manual_seed(2)
    k, v = torch.randn(2, 2, 2, 10, 4, generator=g)
    a, b = pairs(2, 10, 3, g)
    expected = naive_swap(k, a, b), naive_swap(v, a, b)

    def swap_then_read(k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        swap_rows_(k, v, a, b)
        return k.sum() + v.sum()

    compiled = torch.compile(swap_then_read, fullgraph=True, backend="aot_eager")
    total = compiled(k, v, a, b)
    assert torch.equal(k, expected[0]) and torch.equal(v, expected[1])
    torch.testing.assert_close(total, expected[0].sum() + expected[1].sum())
