"""Plain-torch kernel of ``avl::gathered_attention`` (the CPU kernel, and the float64 path on any device).

The kernel streams over the index list in chunks of ``chunk_rows`` entries, so the only temporaries
besides the outputs are one chunk of gathered rows ``[B * Hkv * chunk, D]`` (one buffer, reused for
K and V) and the logits, kept chunk-major ``[n_chunks, B * Hkv, G, chunk]`` so that every chunk is a
contiguous slice:

1. K pass: gather a chunk of K rows, ``logits = q . k`` (one ``bmm`` per chunk, accumulation dtype).
2. Scale, ``-inf`` at skipped entries, softmax over all chunks in place: the logits become ``probs``.
3. V pass: gather the same chunk of V rows, ``out += probs_chunk @ v_chunk`` (``baddbmm_``).

Few, large ops per chunk matter on CPU: every op is a parallel region, and on a busy machine each
one waits for its threads.

Rows are picked with ``index_select`` on a ``[rows, D]`` strided view of the cache storage (row ``r``
starts at element offset ``r``; the offset of cache row ``(b, h, n)`` is ``b*s0 + h*s1 + n*s2``).
That works for any strides without copying the cache, and ``index_select`` into a reused buffer is
several times faster on CPU than ``torch.gather`` with an index expanded over ``D``.
"""

from __future__ import annotations

import torch

# Elements of one gathered chunk [B * Hkv * chunk, D]: 2**19 (2 MiB in fp32) keeps the chunk in
# cache and its buffer small (a fresh buffer costs page faults); at least _MIN_CHUNK entries per chunk
# so that large batches do not pay for many tiny ops. Tuned at LLaVA decode shapes on a 2-core CPU.
_CHUNK_ELEMENTS = 1 << 19
_MIN_CHUNK = 16


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the softmax accumulation and of ``probs``: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_offsets(x: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``[rows, D]`` view over ``x``'s storage and the element offsets of the rows named by ``idx``.

    ``x`` is ``[B, H, N, D]``; ``idx`` is ``[B, H, M]`` int64 with every entry in ``[0, N)``.
    Returns ``(rows [L, D], offsets [B, H, M] int64)`` with ``rows[offsets[b, h, j]] == x[b, h, idx[b, h, j]]``.
    """
    B, H, N, D = x.shape
    s0, s1, s2, s3 = x.stride()
    # Overlapping view: row r = storage elements r, r + s3, ..., r + (D - 1) * s3. Only read from.
    length = (B - 1) * s0 + (H - 1) * s1 + (N - 1) * s2 + 1
    rows = torch.as_strided(x, (length, D), (1, s3), x.storage_offset())  # [L, D]
    b = torch.arange(B, device=x.device).view(B, 1, 1) * s0
    h = torch.arange(H, device=x.device).view(1, H, 1) * s1
    return rows, b + h + idx * s2  # [L, D], [B, H, M]


def gathered_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    scale: float,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of one query token over the cache rows listed in ``idx`` (plain torch).

    Args:
        q: ``[B, Hq, 1, D]`` query, float16/bfloat16/float32/float64.
        k, v: ``[B, Hkv, N, D]`` cache, same dtype as ``q``; ``Hq`` is a multiple of ``Hkv``.
        idx: ``[B, Hkv, M]`` integer row indices into ``N``; entries outside ``[0, N)`` (``-1``) are
            skipped. Duplicated entries each count as one key (as if the row were gathered twice).
        scale: logit scale (usually ``1/sqrt(D)``).
        chunk_rows: index entries per chunk; default keeps a chunk at about 2**19 elements.

    Returns:
        ``(out [B, Hq, 1, D] in q's dtype, probs [B, Hq, M] in float32, float64 for float64 inputs)``.
        A row set without a valid entry gives ``out = 0`` and ``probs = 0``.
    """
    B, Hq, _, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    M = idx.shape[2]
    G = Hq // Hkv  # query heads per kv head
    BH = B * Hkv
    acc = accumulation_dtype(q.dtype)
    if B == 0 or M == 0 or N == 0:
        return q.new_zeros(B, Hq, 1, D), q.new_zeros(B, Hq, M, dtype=acc)

    if chunk_rows is None:
        chunk_rows = max(_MIN_CHUNK, _CHUNK_ELEMENTS // max(1, BH * D))
    c = max(1, min(int(chunk_rows), M))  # index entries per chunk
    n_chunks = -(-M // c)
    # Chunk-major layout [n_chunks, B * Hkv, c], so each chunk is one contiguous slice; the index
    # list is padded with -1 to n_chunks * c entries.
    idx = torch.nn.functional.pad(idx.to(torch.int64), (0, n_chunks * c - M), value=-1)  # [B, Hkv, Mp]
    valid = (idx >= 0) & (idx < N)  # [B, Hkv, Mp]
    safe = torch.where(valid, idx, 0)
    k_rows, k_offs = _row_offsets(k, safe)  # [Lk, D], [B, Hkv, Mp]
    v_rows, v_offs = _row_offsets(v, safe)  # [Lv, D], [B, Hkv, Mp]

    def chunk_major(x: torch.Tensor) -> torch.Tensor:  # [B, Hkv, Mp] -> [n_chunks, B * Hkv, c]
        return x.reshape(BH, n_chunks, c).transpose(0, 1).contiguous()

    k_offs, v_offs, valid = chunk_major(k_offs), chunk_major(v_offs), chunk_major(valid)
    qg = q.reshape(BH, G, D).to(acc)  # [BH, G, D]; head h -> kv head h // G
    buf = torch.empty(BH * c, D, dtype=k.dtype, device=k.device)  # one chunk of gathered rows

    # K pass: logits of every chunk.
    logits = torch.empty(n_chunks, BH, G, c, dtype=acc, device=q.device)  # [n_chunks, BH, G, c]
    for i in range(n_chunks):
        kc = torch.index_select(k_rows, 0, k_offs[i].view(-1), out=buf).view(BH, c, D).to(acc)  # [BH, c, D]
        torch.bmm(qg, kc.transpose(1, 2), out=logits[i])  # [BH, G, c]
    logits.mul_(scale).masked_fill_(~valid.unsqueeze(2), float("-inf"))

    # Softmax over all chunks; an all-skipped row set has max = -inf and gives zeros.
    row_max = logits.amax(dim=(0, 3), keepdim=True)  # [1, BH, G, 1]
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    probs = logits.sub_(row_max).exp_()  # [n_chunks, BH, G, c]; -inf -> 0
    denom = probs.sum(dim=(0, 3), keepdim=True)  # [1, BH, G, 1]
    probs.mul_(torch.where(denom > 0, 1.0 / torch.where(denom > 0, denom, 1.0), 0.0))

    # V pass. Skipped entries gather row 0 of their (b, h), which may hold anything (even NaN in an
    # unused slot), so those rows are zeroed instead of relying on probs == 0.
    any_skipped = not bool(valid.all())
    out = torch.zeros(BH, G, D, dtype=acc, device=q.device)  # [BH, G, D]
    for i in range(n_chunks):
        vc = torch.index_select(v_rows, 0, v_offs[i].view(-1), out=buf).to(acc)  # [BH * c, D]
        if any_skipped:
            vc.index_fill_(0, (~valid[i]).view(-1).nonzero().squeeze(1), 0.0)
        out.baddbmm_(probs[i], vc.view(BH, c, D))  # [BH, G, D]

    probs = probs.permute(1, 2, 0, 3).reshape(BH, G, n_chunks * c)[..., :M]  # [BH, G, M]
    return out.view(B, Hq, 1, D).to(q.dtype), probs.reshape(B, Hq, M)
