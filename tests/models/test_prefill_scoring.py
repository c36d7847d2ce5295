"""Prefill scoring: the attention each row receives, against a per-row naive softmax."""

from __future__ import annotations

import pytest
import torch

from avl.models.layers import attention_received


def naive_received(q_rows, query_index, k, valid, scale):
    b, hq, rows, _ = q_rows.shape
    groups = hq // k.shape[1]
    total = torch.zeros(b, hq, k.shape[2], dtype=torch.float64)
    for s in range(b):
        for h in range(hq):
            for r in range(rows):
                row = int(query_index[s, r])
                if row < 0:
                    continue
                keys = [j for j in range(row + 1) if valid[s, j]]
                logits = torch.stack([q_rows[s, h, r] @ k[s, h // groups, j] for j in keys]) * scale
                total[s, h, keys] += torch.softmax(logits, dim=0)
    return total


@pytest.mark.parametrize("chunk_elements", [1, 50, 1 << 22])
def test_received_attention_equals_the_naive_sum_over_query_rows(chunk_elements):
    """Chunks of one row up to all rows at once (each chunk reads the keys up to its largest row);
    GQA, left padding, unsorted query rows and missing ones (-1)."""
    g = torch.Generator().manual_seed(0)
    b, hq, hkv, length, dim = 2, 4, 2, 23, 8
    q = torch.randn(b, hq, length, dim, generator=g, dtype=torch.float64)
    k = torch.randn(b, hkv, length, dim, generator=g, dtype=torch.float64)
    valid = torch.ones(b, length, dtype=torch.bool)
    valid[0, :4] = False
    query_index = torch.stack([torch.randperm(length, generator=g)[:9] for _ in range(b)])
    query_index[0] = torch.where(query_index[0] < 4, -1, query_index[0])  # padding rows score nothing
    query_index[1, -2:] = -1
    q_rows = q.gather(2, query_index.clamp(min=0)[:, None, :, None].expand(-1, hq, -1, dim))
    got = attention_received(q_rows, query_index, k, valid, 0.3, chunk_elements=chunk_elements)
    torch.testing.assert_close(got, naive_received(q_rows, query_index, k, valid, 0.3), rtol=0, atol=1e-12)
