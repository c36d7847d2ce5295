"""Plain-torch kernel of ``avl::gathered_attention`` (the CPU kernel, and the float64 path on any device).

The index list is split into column runs. A *dense* run is a block of columns whose entries are,
for every (batch, kv head), either skipped or ``base + column`` for one shared ``base``: rows that
lie back to back in every head's cache (a cache's system rows, its evictable region). Those are
read in place through a strided view, one ``bmm`` per run and pass, at the speed of dense
attention. The other columns (a scattered core set) are *gathered* in chunks of ``chunk_rows``
entries into one reused buffer ``[B * Hkv * chunk, D]``:

1. K pass: ``logits = q . k`` per run (accumulation dtype), into one ``[B * Hkv, G, M]`` buffer.
2. Scale, ``-inf`` at skipped entries, softmax in place: the logits become ``probs``.
3. V pass: ``out += probs_run @ v_run`` per run (``baddbmm_``).

A dense run reads its skipped rows too (their probability is 0); if such a row holds a non-finite
value the product is not finite, and the call falls back to gathering every column, so skipped rows
never change the result. Few, large ops matter on CPU: every op is a parallel region.

Rows are gathered with ``index_select`` on a ``[rows, D]`` strided view of the cache storage (row
``r`` starts at element offset ``r``; the offset of cache row ``(b, h, n)`` is ``b*s0 + h*s1 + n*s2``).
That works for any strides without copying the cache, and ``index_select`` into a reused buffer is
several times faster on CPU than ``torch.gather`` with an index expanded over ``D``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Elements of one gathered chunk [B * Hkv * chunk, D]: 2**19 (2 MiB in fp32) keeps the chunk in
# cache and its buffer small (a fresh buffer costs page faults); at least _MIN_CHUNK entries per chunk
# so that large batches do not pay for many tiny ops. Tuned at LLaVA decode shapes on a 2-core CPU.
_CHUNK_ELEMENTS = 1 << 19
_MIN_CHUNK = 16
_MIN_DENSE = 16  # shortest run of consecutive rows read in place rather than gathered


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


@dataclass(frozen=True)
class _Run:
    """Columns [start, stop) of the index list; `base` >= 0: dense (rows base + j - start), -1: gathered."""

    start: int
    stop: int
    base: int


def _column_runs(idx: torch.Tensor, valid: torch.Tensor, n_rows: int) -> list[_Run]:
    """Split the columns of idx [B, Hkv, M] into dense and gathered runs (see the module docstring).

    A column is dense-able when all its valid entries are one row r; its offset is r - column. A
    column with no valid entry takes the offset of the column before it. Dense runs shorter than
    _MIN_DENSE columns are gathered instead (a bmm per few rows costs more than it saves)."""
    M = idx.shape[2]
    value = torch.where(valid, idx, -1).amax(dim=(0, 1))  # [M]
    uniform = ((idx == value) | ~valid).all(dim=1).all(dim=0)  # [M]
    empty = value < 0
    column = torch.arange(M, device=idx.device)
    offset = value - column
    # carry the last defined offset over empty columns (cummax of the defined columns' positions)
    last = torch.where(empty, -1, column).cummax(0).values
    offset = torch.where(last >= 0, offset[last.clamp(min=0)], 0)
    dense = uniform & (last >= 0) & (offset + column < n_rows)
    key = torch.where(dense, offset, -1)  # -1: gathered
    starts = torch.cat([torch.ones(1, dtype=torch.bool, device=idx.device), key[1:] != key[:-1]]).nonzero()[:, 0]
    bounds = starts.tolist() + [M]
    keys = key[starts].tolist()
    runs: list[_Run] = []
    for start, stop, k in zip(bounds[:-1], bounds[1:], keys):
        base = k + start if k >= 0 and stop - start >= _MIN_DENSE else -1
        if runs and base < 0 and runs[-1].base < 0:
            runs[-1] = _Run(runs[-1].start, stop, -1)
        else:
            runs.append(_Run(start, stop, base))
    return runs


def gathered_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    scale: float,
    chunk_rows: int | None = None,
    dense_runs: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of one query token over the cache rows listed in ``idx`` (plain torch).

    Args:
        q: ``[B, Hq, 1, D]`` query, float16/bfloat16/float32/float64.
        k, v: ``[B, Hkv, N, D]`` cache, same dtype as ``q``; ``Hq`` is a multiple of ``Hkv``.
        idx: ``[B, Hkv, M]`` integer row indices into ``N``; entries outside ``[0, N)`` (``-1``) are
            skipped. Duplicated entries each count as one key (as if the row were gathered twice).
        scale: logit scale (usually ``1/sqrt(D)``).
        chunk_rows: index entries per gathered chunk; default keeps a chunk at about 2**19 elements.
        dense_runs: read runs of consecutive rows in place (the default); False gathers every column.

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
    chunk = max(1, int(chunk_rows))
    idx = idx.to(torch.int64)
    valid = (idx >= 0) & (idx < N)  # [B, Hkv, M]
    runs = _column_runs(idx, valid, N) if dense_runs else [_Run(0, M, -1)]
    safe = torch.where(valid, idx, 0)
    k_rows, k_offs = _row_offsets(k, safe)  # [Lk, D], [BH, M] after the view below
    v_rows, v_offs = _row_offsets(v, safe)
    k_offs, v_offs, flat_valid = k_offs.view(BH, M), v_offs.view(BH, M), valid.view(BH, M)
    qg = q.reshape(BH, G, D).to(acc)  # [BH, G, D]; head h -> kv head h // G
    buf = torch.empty(BH * min(chunk, M), D, dtype=k.dtype, device=k.device)  # one chunk of rows

    def pieces(run: _Run, x: torch.Tensor, rows: torch.Tensor, offs: torch.Tensor):
        """(columns, rows [BH, c, D] in acc) of a run, chunk by chunk."""
        step = run.stop - run.start if run.base >= 0 and x.dtype == acc else chunk
        for c0 in range(run.start, run.stop, step):
            c1 = min(c0 + step, run.stop)
            if run.base >= 0:
                block = x[:, :, run.base + c0 - run.start: run.base + c1 - run.start].reshape(BH, c1 - c0, D)
            else:
                picked = torch.index_select(rows, 0, offs[:, c0:c1].reshape(-1), out=buf[: BH * (c1 - c0)])
                block = picked.view(BH, c1 - c0, D)
            yield c0, c1, block.to(acc)

    # K pass: logits of every run.
    logits = torch.empty(BH, G, M, dtype=acc, device=q.device)  # [BH, G, M]
    for run in runs:
        for c0, c1, kc in pieces(run, k, k_rows, k_offs):
            logits[:, :, c0:c1] = torch.bmm(qg, kc.transpose(1, 2))  # [BH, G, c]
    logits.mul_(scale).masked_fill_(~flat_valid.unsqueeze(1), float("-inf"))

    # Softmax over M; an all-skipped row set has max = -inf and gives zeros.
    row_max = logits.amax(dim=2, keepdim=True)  # [BH, G, 1]
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    probs = logits.sub_(row_max).exp_()  # [BH, G, M]; -inf -> 0
    denom = probs.sum(dim=2, keepdim=True)
    probs.mul_(torch.where(denom > 0, 1.0 / torch.where(denom > 0, denom, 1.0), 0.0))

    # V pass. A gathered skipped entry takes row 0 of its (b, h), which may hold anything (even NaN in
    # an unused slot), so gathered rows of skipped entries are zeroed instead of relying on probs == 0.
    any_skipped = not bool(valid.all())
    out = torch.zeros(BH, G, D, dtype=acc, device=q.device)  # [BH, G, D]
    for run in runs:
        for c0, c1, vc in pieces(run, v, v_rows, v_offs):
            if any_skipped and run.base < 0:
                vc = vc.masked_fill(~flat_valid[:, c0:c1, None], 0.0)
            out.baddbmm_(probs[:, :, c0:c1], vc)  # [BH, G, D]
    if any_skipped and any(run.base >= 0 for run in runs) and not bool(torch.isfinite(out).all()):
        return gathered_attention_torch(q, k, v, idx, scale, chunk_rows, dense_runs=False)  # a skipped row was not finite
    return out.view(B, Hq, 1, D).to(q.dtype), probs.view(B, Hq, M)
