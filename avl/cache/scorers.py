"""Prefill KV-selection rules of NVIDIA kvpress 0.5.5, as pure functions of one layer's tensors.

kvpress compresses each layer's cache once, right after that layer's prefill attention, and never
evicts during decode. Its code is the reference; these functions reproduce it operation for
operation (same dtype casts, pooling, GQA averaging, rounding and `torch.topk` calls), so the kept
rows are the same, ties included. avl's `keep` is the share kept, `1 - compression_ratio`; a
kvpress run with ratio `c` is reproduced by `keep` when `1 - c == keep` in floating point (true of
0.5 and 0.3 / 0.7, the ratios of the parity fixture), because kvpress computes `1 - c` and avl
uses `keep` where kvpress has that product.

Shapes: q [B, Hq, L, D] (rotary applied), k [B, Hkv, L, D], valid [B, L] (False on left padding).
Scores are [B, Hkv, L] (higher = kept), -inf on padding. kvpress runs one sample at a time; avl
computes every sample on its own valid rows (the last `n_b` rows of a left-padded batch), exactly
as kvpress would on that prompt alone, so a batched prefill keeps what each prompt alone keeps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from avl.models.layers import repeat_kv


def lengths_of(valid: Tensor) -> list[int]:
    """Valid rows per sample of a left-padded valid [B, L] mask; raises unless each row is padding
    then prompt (False* True*)."""
    if valid.dim() != 2 or valid.dtype != torch.bool:
        raise ValueError(f"valid has shape {tuple(valid.shape)} and dtype {valid.dtype}; allowed: [B, L] bool")
    if bool((valid[:, 1:] < valid[:, :-1]).any()):
        raise ValueError("valid is not left padding; allowed: each row False* True* (padding, then the prompt)")
    return valid.sum(-1).tolist()


def n_kept(length: int, keep: float) -> int:
    """kvpress's `compute_n_kept`: `max(1, int(length * keep))` rows of `length` (keep in (0, 1])."""
    return max(1, int(length * keep))


def _per_sample(rows: Tensor, valid: Tensor) -> list[tuple[int, int]]:
    """(sample, first valid row) of each sample of rows [B, H, L, ...] (keys or scores), checking
    valid [B, L] against its batch and length."""
    if valid.shape != (rows.shape[0], rows.shape[2]):
        raise ValueError(f"valid has shape {tuple(valid.shape)}; allowed: [B, L] = {[rows.shape[0], rows.shape[2]]}")
    length = valid.shape[1]
    return [(b, length - n) for b, n in enumerate(lengths_of(valid))]


def _check_qk(q: Tensor, k: Tensor) -> None:
    if (q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]
            or q.shape[1] % k.shape[1]):
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} do not match; allowed: q [B, Hq, L, D], "
                         "k [B, Hkv, L, D] with Hkv dividing Hq")


def _padded(k: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.full(k.shape[:3], float("-inf"), dtype=dtype, device=k.device)


def snapkv_scores(q: Tensor, k: Tensor, valid: Tensor, scale: float, window_size: int = 64,
                  kernel_size: int = 5) -> Tensor:
    """SnapKV (kvpress `SnapKVPress.score`), per sample over its n valid rows:

    - the last `window_size` queries attend all n keys (causal within the window), softmax in
      float32 and cast back to q's dtype; the window's own key columns are then dropped;
    - mean over the window's queries, `avg_pool1d(kernel_size, padding=kernel_size // 2, stride 1)`
      (zero padding counted in the mean), then the mean over the query heads sharing a KV head;
    - the window rows get `max + 1` (the sample's maximum over all heads), so they are kept first.
      When fewer rows are kept than the window holds (SnapKV's default window of 64 on a prompt
      of under 128 rows at keep 0.5), every kept row is a window row, picked among these equal
      scores by `torch.topk`'s tie order (the most recent ones on CPU in the parity fixture).

    kvpress scales the logits by `1 / sqrt(head_dim)`; avl uses the layer's own `scale`, the same
    number for every family avl runs (Llama, Mistral, Qwen). Raises when n <= window_size (kvpress
    asserts). `kernel_size` must be odd, else kvpress's pooled length does not fit its reshape.
    """
    _check_qk(q, k)
    heads, kv_heads = q.shape[1], k.shape[1]
    groups = heads // kv_heads
    out = _padded(k, q.dtype)
    for b, start in _per_sample(k, valid):
        n = k.shape[2] - start
        if n <= window_size:
            raise ValueError(f"sample {b} has {n} prompt rows; SnapKV needs more than window_size={window_size}")
        queries = q[b:b + 1, :, -window_size:]
        keys = repeat_kv(k[b:b + 1, :, start:], groups)
        logits = torch.matmul(queries, keys.transpose(2, 3)) * scale  # [1, Hq, w, n]
        logits = logits + torch.full_like(logits, float("-inf")).triu(diagonal=n - window_size + 1)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32).to(q.dtype)[..., :-window_size]
        scores = F.avg_pool1d(probs.mean(dim=-2), kernel_size=kernel_size, padding=kernel_size // 2, stride=1)
        scores = scores.view(1, kv_heads, groups, n - window_size).mean(2)
        out[b:b + 1, :, start:] = F.pad(scores, (0, window_size), value=scores.max().item() + 1)
    return out


def pyramidkv_budget(layer: int, num_layers: int, length: int, keep: float, window_size: int = 64,
                     beta: int = 20) -> int:
    """Rows PyramidKV keeps in `layer` of `num_layers` for a prompt of `length` rows
    (kvpress `PyramidKVPress.get_layer_budget`, after KVCache-Factory's pyramid):

    capacity = window + length * keep; min = (capacity - window) / beta; max = 2 (capacity - window)
    - min; if max >= length - window: max = length - window and min = 2 (capacity - window) - max.
    Unless length >= max >= min >= window, the budget is SnapKV's, `max(1, round(length * keep))`
    (round: half to even; note SnapKV itself floors); otherwise it falls linearly from max in
    layer 0 to min in the last layer, `round(max - layer * (max - min) / (num_layers - 1))`.
    """
    capacity = window_size + length * keep
    min_num = (capacity - window_size) / beta
    max_num = (capacity - window_size) * 2 - min_num
    if max_num >= length - window_size:
        max_num = length - window_size
        min_num = (capacity - window_size) * 2 - max_num
    if not (length >= max_num >= min_num >= window_size):
        return max(1, round(length * keep))
    steps = (max_num - min_num) / (num_layers - 1) if num_layers > 1 else 0.0
    return round(max_num - layer * steps)


def knorm_scores(k: Tensor, valid: Tensor) -> Tensor:
    """KNorm (kvpress `KnormPress.score`): minus the L2 norm of each key, computed in at least
    float32 (float64 keys stay float64), so low-norm keys are kept."""
    dtype = torch.promote_types(k.dtype, torch.float32)
    out = _padded(k, dtype)
    for b, start in _per_sample(k, valid):
        out[b, :, start:] = -torch.linalg.vector_norm(k[b, :, start:], dim=-1, dtype=dtype)
    return out


def observed_attention_scores(q: Tensor, k: Tensor, valid: Tensor, scale: float) -> Tensor:
    """ObservedAttention (kvpress `ObservedAttentionPress.score`, on the eager attention weights):
    the attention each key receives, summed over all prompt queries, divided by the number of
    queries that can see it (n - j for key j of n), then the mean over the query heads of each KV
    head. Probabilities as transformers' eager attention gives them: softmax in float32, cast back
    to q's dtype before the sum.

    This is an average, where avl's H2O baseline sums: H2O's accumulated score favours early rows
    (more queries see them), this one does not. And kvpress keeps the top rows by this score alone,
    once after prefill, with no recent window and no eviction in decode; H2O keeps heavy 25% /
    recent 75% and goes on evicting as tokens are generated.

    Memory: the full [Hq, n, n] probabilities of one sample at a time, as kvpress's eager path.
    """
    _check_qk(q, k)
    heads, kv_heads = q.shape[1], k.shape[1]
    out = _padded(k, q.dtype)
    for b, start in _per_sample(k, valid):
        n = k.shape[2] - start
        keys = repeat_kv(k[b:b + 1, :, start:], heads // kv_heads)
        logits = torch.matmul(q[b:b + 1, :, start:], keys.transpose(2, 3)) * scale  # [1, Hq, n, n]
        logits = logits + torch.full_like(logits, float("-inf")).triu(diagonal=1)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32).to(q.dtype)
        scores = probs.sum(2) / torch.arange(n, 0, -1, device=q.device, dtype=q.dtype)
        out[b:b + 1, :, start:] = scores.view(1, kv_heads, -1, n).mean(2)
    return out


def random_scores(k: Tensor, valid: Tensor, seed: int) -> Tensor:
    """RandomPress with a seed: `torch.rand` of [1, Hkv, n] in k's dtype from a generator seeded
    with `seed` afresh for every layer and sample (so every layer draws the same numbers, as in
    kvpress, and each sample draws what it would draw alone)."""
    out = _padded(k, k.dtype)
    for b, start in _per_sample(k, valid):
        generator = torch.Generator(device=k.device).manual_seed(seed)
        out[b:b + 1, :, start:] = torch.rand(1, k.shape[1], k.shape[2] - start, generator=generator,
                                             device=k.device, dtype=k.dtype)
    return out


def topk_mask(scores: Tensor, counts: list[int], valid: Tensor) -> Tensor:
    """Keep mask [B, Hkv, L]: per sample b and head, the `counts[b]` highest scores among its valid
    rows, chosen by `torch.topk` on that sample's [1, Hkv, n] scores exactly as kvpress calls it
    (so ties fall as they fall in kvpress)."""
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    for (b, start), count in zip(_per_sample(scores, valid), counts):
        index = scores[b:b + 1, :, start:].topk(count, dim=-1).indices
        keep[b:b + 1, :, start:].scatter_(-1, index, True)
    return keep


def kept_mask(scores: Tensor, keep: float, valid: Tensor) -> Tensor:
    """kvpress's `ScorerPress.compress`: every head keeps its top `n_kept(n, keep)` rows."""
    return topk_mask(scores, [n_kept(n, keep) for n in lengths_of(valid)], valid)


def adakv_keep(scores: Tensor, keep: float, alpha_safeguard: float, valid: Tensor) -> Tensor:
    """AdaKV (kvpress `AdaKVPress.compress`): head-adaptive budgets over a scorer's scores, per sample:

    - n_kept = `n_kept(n, keep)`; each head first secures its top n_safe = int(n_kept * alpha)
      rows (at least 1 when alpha > 0), their scores set to the dtype's max;
    - then the `Hkv * (n - n_kept)` lowest scores over all heads together are dropped (one
      `topk` of the negated, flattened [1, Hkv * n] scores), so heads keep different counts.

    kvpress does not remove those rows: it masks them in later attention (a fake key). The mask
    returned here is that decision: True = attended.
    """
    out = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    heads = scores.shape[1]
    for b, start in _per_sample(scores, valid):
        s = scores[b:b + 1, :, start:].clone()
        n = s.shape[2]
        kept = n_kept(n, keep)
        n_safe = int(kept * alpha_safeguard)
        if alpha_safeguard > 0:
            n_safe = max(1, n_safe) if kept > 0 else 0
        s.scatter_(-1, torch.topk(s, n_safe, dim=-1).indices, torch.finfo(s.dtype).max)
        pruned = torch.topk(-s.reshape(1, -1), heads * (n - kept), dim=1).indices.flatten()
        mask = torch.ones(heads * n, dtype=torch.bool, device=scores.device)
        mask[pruned] = False
        out[b, :, start:] = mask.view(heads, n)
    return out
