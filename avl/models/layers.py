"""Blocks shared by the decoder families: RMSNorm, rotary embedding, gated MLP, prefill attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype for normalisation statistics and softmax: at least float32, float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class RMSNorm(nn.Module):
    """Root-mean-square norm (Llama), statistics in at least float32.

    `island_dtype` pins the statistics dtype (float32 in a float64 model reproduces a reference
    implementation's `x.float()` for parity tests); None: at least float32, float64 stays float64.
    """

    island_dtype: torch.dtype | None = None

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        h = x.to(self.island_dtype or compute_dtype(x.dtype))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class GatedMLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rotary_cos_sin(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Rotary tables for integer positions [B, L] -> cos, sin [B, 1, L, head_dim].

    Computed on the fly in float32 (as the reference implementations do), so models keep no
    non-persistent buffers and build cleanly on the meta device.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.to(torch.float32)[..., None] * inv_freq  # [B, L, head_dim/2]
    angles = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B, 1, L, head_dim]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the two halves of the head dimension of x [B, H, L, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def repeat_kv(x: Tensor, groups: int) -> Tensor:
    """[B, Hkv, L, D] -> [B, Hkv * groups, L, D] (grouped-query attention)."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def prefill_attention(q: Tensor, k: Tensor, v: Tensor, valid: Tensor, scale: float) -> Tensor:
    """Dense causal attention over a left-padded prompt.

    q [B, Hq, L, D], k/v [B, Hkv, L, D], valid [B, L] (False on padding). A padded query row
    attends to itself only, so no row is empty; its output is never used. Without padding the
    kernel is told the mask is causal (it then skips the blocks above the diagonal: half the time
    at 2921 rows on CPU, the same result).
    """
    groups = q.shape[1] // k.shape[1]
    if bool(valid.all()):
        return F.scaled_dot_product_attention(q, repeat_kv(k, groups), repeat_kv(v, groups), is_causal=True, scale=scale)
    length = q.shape[2]
    causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    mask = causal & valid[:, None, None, :]  # [B, 1, L, L]
    mask = mask | torch.eye(length, dtype=torch.bool, device=q.device)
    return F.scaled_dot_product_attention(q, repeat_kv(k, groups), repeat_kv(v, groups), attn_mask=mask, scale=scale)


def attention_probs(
    q_rows: Tensor, query_index: Tensor, k: Tensor, valid: Tensor, scale: float, chunk: int = 256
) -> Tensor:
    """Causal attention probabilities of selected query rows, recomputed for a policy's statistics.

    q_rows [B, Hq, R, D] are the queries at token indices query_index [B, R] (-1 = no row);
    k [B, Hkv, L, D]; valid [B, L]. Returns probs [B, Hq, R, L] in at least float32 (rows of
    missing queries are 0). Computed in chunks of query rows so a long prompt never needs the
    full [L, L] matrix of every head at once.
    """
    groups = q_rows.shape[1] // k.shape[1]
    keys = repeat_kv(k, groups).to(compute_dtype(k.dtype))
    key_index = torch.arange(k.shape[2], device=k.device)
    out = []
    for start in range(0, q_rows.shape[2], chunk):
        q = q_rows[:, :, start : start + chunk].to(keys.dtype)
        rows = query_index[:, start : start + chunk]  # [B, r]
        scores = torch.einsum("bhrd,bhld->bhrl", q, keys) * scale
        allowed = (key_index[None, None, :] <= rows[:, :, None]) & valid[:, None, :]  # [B, r, L]
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out.append(probs.nan_to_num(0.0).masked_fill((rows < 0)[:, None, :, None], 0.0))
    return torch.cat(out, dim=2)


def attention_received(q_rows: Tensor, query_index: Tensor, k: Tensor, valid: Tensor, scale: float,
                       chunk_elements: int = 1 << 22) -> Tensor:
    """Attention each key row receives from the selected query rows, summed over them: [B, Hq, L].

    Same inputs as `attention_probs`, but the probabilities are summed chunk by chunk of query
    rows (at most `chunk_elements` probabilities at a time, and no more than q_rows has elements)
    and the query heads of a KV head share its keys, so neither the [B, Hq, R, L] matrix nor
    repeated keys are ever held: a policy's prefill scoring costs about two chunks of memory, at
    most twice the queries it scores. (2**22 probabilities, 16 MiB in float32, measured fastest on
    a 2-core CPU at 7B shapes and 2921 rows: 0.75 s a layer, 1.9 s with 2**19.) A chunk reads the
    keys up to its largest query row only.
    """
    b, hq, n_rows, d = q_rows.shape
    hkv, length = k.shape[1], k.shape[2]
    groups = hq // hkv
    keys = k.to(compute_dtype(k.dtype))
    key_index = torch.arange(length, device=k.device)
    chunk = max(1, min(chunk_elements, q_rows.numel()) // max(1, b * hq * length))
    total = torch.zeros(b, hkv, groups, length, dtype=keys.dtype, device=k.device)
    for start in range(0, n_rows, chunk):
        q = q_rows[:, :, start:start + chunk].to(keys.dtype).unflatten(1, (hkv, groups))  # [B, Hkv, G, r, D]
        rows = query_index[:, start:start + chunk]  # [B, r]
        end = int(rows.max()) + 1  # causal: no row of the chunk attends a key past the chunk's last row
        if end == 0:
            continue
        scores = torch.einsum("bkgrd,bkld->bkgrl", q, keys[:, :, :end]).mul_(scale)
        allowed = (key_index[None, None, :end] <= rows[:, :, None]) & valid[:, None, :end] & (rows >= 0)[:, :, None]
        scores.masked_fill_(~allowed[:, None, None], float("-inf"))
        total[..., :end] += torch.softmax(scores, dim=-1).nan_to_num_(0.0).sum(3)  # peak: two chunks of probabilities
    return total.flatten(1, 2)
