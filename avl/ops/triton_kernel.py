"""Triton kernel of ``avl::gathered_attention`` (flash-decoding: split over the index list, then reduce).

Importing this module needs ``triton``; :mod:`avl.ops` imports it lazily, only when a CUDA tensor
reaches the op. With ``TRITON_INTERPRET=1`` set before ``triton`` is imported, the same kernels run on
CPU tensors (slowly); the tests use that.

Kernel 1, ``_split_kernel``, grid ``(B * Hkv, S)``: program ``(b, kv head, split s)`` owns index
entries ``[s * chunk, (s + 1) * chunk)`` of ``idx[b, kv head]`` and all ``G = Hq // Hkv`` query heads
of that kv head. It walks its entries in tiles of ``BLOCK_M``, loads the listed K and V rows straight
from the cache (masked loads, no gathered copy), and keeps an online softmax (running max ``m``, sum
``l``, weighted V sum ``acc``) in fp32. It also writes the scaled logits (``-inf`` for skipped
entries) into the ``probs`` output.

Kernel 2, ``_reduce_kernel``, grid ``(B * Hq,)``: combines the ``S`` partial ``(m, l, acc)`` of one
query head into ``out = sum_s exp(m_s - m) acc_s / sum_s exp(m_s - m) l_s`` and then normalises that
head's logits in place, ``probs = exp(logit - m) / l``. Storing logits and normalising afterwards
reads each K row once (a second pass over K would re-read M rows from memory); the logits are
``Hq * M`` floats, tiny next to the K/V rows.

Numerics: ``q . k`` and ``p @ v`` use ``tl.dot`` with fp32 accumulation when a kv head has at least 4
query heads (padded to 16 rows, the smallest tensor-core tile) and an exact fp32 broadcast-multiply
-reduce otherwise (no dot tile is wasted on a single query row). fp32 inputs use
``input_precision="ieee"`` (no TF32); fp16/bf16 inputs multiply in their own precision, and the
softmax weights are rounded to the input dtype before ``p @ v`` on the dot path, as in
FlashAttention. float64 is not supported here (callers route it to the torch kernel).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _split_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr,  # inputs
    logits_ptr, m_ptr, l_ptr, acc_ptr,  # outputs: [B, Hq, M], [B, Hq, S], [B, Hq, S], [B, Hq, S, D]
    scale, N, M, D, HKV, HQ, S, chunk,
    sq_b, sq_h, sq_d,
    sk_b, sk_h, sk_n, sk_d,
    sv_b, sv_h, sv_n, sv_d,
    si_b, si_h, si_m,
    G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    hkv = (pid_bh % HKV).to(tl.int64)

    offs_g = tl.arange(0, BLOCK_G)  # query heads of this kv head
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < G
    d_mask = offs_d < D
    heads = hkv * G + offs_g  # [BG]

    q = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + offs_d[None, :] * sq_d,
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # [BG, BD]
    if not USE_DOT:
        q = q.to(tl.float32)
    k_base = k_ptr + b * sk_b + hkv * sk_h
    v_base = v_ptr + b * sv_b + hkv * sv_h
    idx_base = idx_ptr + b * si_b + hkv * si_h
    logits_base = logits_ptr + (b * HQ + heads[:, None]) * M  # [BG, 1]

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)

    start = pid_s * chunk
    for m0 in range(0, chunk, BLOCK_M):
        offs_m = start + m0 + tl.arange(0, BLOCK_M)  # [BM]
        m_mask = offs_m < M
        rows = tl.load(idx_base + offs_m * si_m, mask=m_mask, other=-1)  # [BM]
        valid = (rows >= 0) & (rows < N) & m_mask
        rows = tl.where(valid, rows, 0).to(tl.int64)
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(k_base + rows[:, None] * sk_n + offs_d[None, :] * sk_d, mask=kv_mask, other=0.0)  # [BM, BD]
        if USE_DOT:
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BG, BM]
        else:
            s = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)  # [BG, BM]
        s = tl.where(valid[None, :], s * scale, float("-inf"))
        tl.store(logits_base + offs_m[None, :], s, mask=g_mask[:, None] & m_mask[None, :])

        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # [BG]
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all skipped so far: keep zeros
        alpha = tl.exp(m_i - m_safe)  # [BG]
        p = tl.exp(s - m_safe[:, None])  # [BG, BM]; skipped entries -> 0
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + rows[:, None] * sv_n + offs_d[None, :] * sv_d, mask=kv_mask, other=0.0)  # [BM, BD]
        if USE_DOT:
            pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)  # [BG, BD]
        else:
            pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)  # [BG, BD]
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    part = (b * HQ + heads) * S + pid_s  # [BG]
    tl.store(m_ptr + part, m_i, mask=g_mask)
    tl.store(l_ptr + part, l_i, mask=g_mask)
    tl.store(acc_ptr + part[:, None] * D + offs_d[None, :], acc, mask=g_mask[:, None] & d_mask[None, :])


@triton.jit
def _reduce_kernel(
    probs_ptr, m_ptr, l_ptr, acc_ptr, out_ptr,  # probs holds logits on entry: [B, Hq, M]
    M, D, HQ, S,
    so_b, so_h, so_d,
    BLOCK_S: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # b * HQ + h
    b = pid // HQ
    h = pid % HQ
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < S
    d_mask = offs_d < D

    m_s = tl.load(m_ptr + pid * S + offs_s, mask=s_mask, other=float("-inf"))  # [BS]
    l_s = tl.load(l_ptr + pid * S + offs_s, mask=s_mask, other=0.0)  # [BS]
    m = tl.max(m_s, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)  # no valid entry anywhere: everything stays 0
    w = tl.exp(m_s - m)  # [BS]
    denom = tl.sum(l_s * w, axis=0)
    inv = tl.where(denom > 0.0, 1.0 / tl.where(denom > 0.0, denom, 1.0), 0.0)

    acc = tl.load(acc_ptr + (pid * S + offs_s[:, None]) * D + offs_d[None, :],
                  mask=s_mask[:, None] & d_mask[None, :], other=0.0)  # [BS, BD]
    o = tl.sum(acc * w[:, None], axis=0) * inv  # [BD]
    tl.store(out_ptr + b * so_b + h * so_h + offs_d * so_d, o.to(out_ptr.dtype.element_ty), mask=d_mask)

    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask = offs_m < M
        x = tl.load(probs_ptr + pid * M + offs_m, mask=mask, other=float("-inf"))
        tl.store(probs_ptr + pid * M + offs_m, tl.exp(x - m) * inv, mask=mask)


def _default_splits(device: torch.device, programs: int, tiles: int) -> int:
    """Splits of the index list so that ``programs * splits`` covers the GPU about twice."""
    if device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:  # the interpreter runs programs one after another: fewer is faster
        target = 1
    return max(1, min(triton.cdiv(target, max(programs, 1)), tiles))


def gathered_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the Triton kernels; same contract as :func:`avl.ops.reference.gathered_attention_torch`.

    No validation (the :func:`avl.ops.gathered_attention` wrapper does it); entries of ``idx``
    outside ``[0, N)`` are skipped. ``num_splits`` (default: enough to cover the GPU) sets how many
    programs share one (batch, kv head) row set. Inputs float16/bfloat16/float32, on a CUDA device,
    or on CPU under ``TRITON_INTERPRET=1``.

    Returns:
        ``(out [B, Hq, 1, D] in q's dtype, probs [B, Hq, M] float32)``.
    """
    if q.dtype not in _SUPPORTED:
        raise TypeError(f"gathered_attention_triton: dtype {q.dtype} is not supported, expected one of "
                        f"{list(_SUPPORTED)} (float64 goes through avl.ops.reference.gathered_attention_torch)")
    B, Hq, _, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    M = idx.shape[2]
    G = Hq // Hkv
    if B == 0 or M == 0:  # nothing to launch; an empty row set gives zeros
        return (torch.zeros(B, Hq, 1, D, dtype=q.dtype, device=q.device),
                torch.zeros(B, Hq, M, dtype=torch.float32, device=q.device))
    out = torch.empty(B, Hq, 1, D, dtype=q.dtype, device=q.device)  # [B, Hq, 1, D], all written by kernel 2
    probs = torch.empty(B, Hq, M, dtype=torch.float32, device=q.device)  # [B, Hq, M], all written by kernel 1

    use_dot = G >= 4
    block_g = max(16, triton.next_power_of_2(G)) if use_dot else triton.next_power_of_2(G)
    block_d = max(16, triton.next_power_of_2(D))
    if use_dot:
        block_m = 64
    else:  # keep the [BG, BM, BD] product of the broadcast path at 8K elements (64 fp32 registers/thread)
        block_m = max(16, min(64, 8192 // (block_g * block_d)))
    tiles = triton.cdiv(M, block_m)
    splits = num_splits if num_splits is not None else _default_splits(q.device, B * Hkv, tiles)
    splits = max(1, min(int(splits), tiles))
    chunk = triton.cdiv(tiles, splits) * block_m  # index entries per split, a multiple of block_m
    splits = triton.cdiv(M, chunk)

    m_part = torch.empty(B, Hq, splits, dtype=torch.float32, device=q.device)  # [B, Hq, S]
    l_part = torch.empty_like(m_part)  # [B, Hq, S]
    acc_part = torch.empty(B, Hq, splits, D, dtype=torch.float32, device=q.device)  # [B, Hq, S, D]
    _split_kernel[(B * Hkv, splits)](
        q, k, v, idx,
        probs, m_part, l_part, acc_part,
        float(scale), N, M, D, Hkv, Hq, splits, chunk,
        q.stride(0), q.stride(1), q.stride(3),
        *k.stride(),
        *v.stride(),
        *idx.stride(),
        G=G, BLOCK_G=block_g, BLOCK_M=block_m, BLOCK_D=block_d, USE_DOT=use_dot,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32: no TF32 rounding
        num_warps=4,
    )
    _reduce_kernel[(B * Hq,)](
        probs, m_part, l_part, acc_part, out,
        M, D, Hq, splits,
        out.stride(0), out.stride(1), out.stride(3),
        BLOCK_S=triton.next_power_of_2(splits), BLOCK_M=256, BLOCK_D=block_d,
        num_warps=4,
    )
    return out, probs
