"""VL-Cache: post-vision attention scores and a layer-adaptive, sparsity-aware budget.

Tu, Vashchilenko, Lu and Xu, "VL-Cache: Sparsity and Modality-Aware KV Cache Compression for
Vision-Language Model Inference Acceleration" (ICLR 2025, arXiv 2410.23317), Section 4. No code
release or port was found (GitHub repositories named vl-cache / vlcache, kvpress, issue and page
corpora searched), so avl implements the paper's rules; they are stated here as the project's
issue reads Section 4 (the reference corpora at hand hold the paper's abstract and overview, where
Figure 4 says: per-layer budgets from the layer-wise sparsity, then post-vision attention selects
"both critical visual and language tokens"):

- post-vision rows: the prompt rows after its last image row (the text the question is in). Their
  attention, taken in each layer's prefill, drives both decisions. A prompt without an image has
  every row post-vision (VL-Cache is then plain accumulated attention).
- token scores (modality-aware scoring, "post-vision attention"): each row's score is the attention
  probability it receives from the post-vision queries, summed over them and over the query heads
  of its KV head (the paper's column sum of the post-vision attention; sums and means rank alike).
  Every prompt row is scored and may be evicted, image and text alike.
- layer sparsity (sparsity-aware budget): in layer l, the share gamma_l of the post-vision attention
  entries (every head, every post-vision query, every key it can see) below `threshold` (the paper's
  p, 1%) times its row's largest entry.
- layer budgets: a sample of n prompt rows keeps `keep * n` rows per layer on average, `keep * n * L`
  over its L self-attention layers, split in proportion to each layer's density 1 - gamma_l:
  `budget_l = floor(keep * n * L * (1 - gamma_l) / sum_j (1 - gamma_j))`, clipped to [1, n]. Each KV
  head of layer l keeps its top `budget_l` rows by score; decode then evicts nothing (every generated
  row is kept), as for the kvpress-pinned policies.

Choices the paper leaves open, made here: the rows keep no protected window (the post-vision rows
compete with the image rows on their scores, as the paper's "both critical visual and language
tokens"); the budget is floored and a layer's budget above n is clipped, its excess not given to
other layers; sparsity and scores are computed in at least float32 (the probabilities avl's other
attention statistics use). Every sample is scored and budgeted on its own rows, so a left-padded
batch keeps what each prompt keeps alone.

Memory: the budget split needs every layer's sparsity, known only after the last layer, so each
layer's full K/V is held until the prefill's end (`Policy.layer_scores`), the peak of the
uncompressed cache, as in the paper (which compresses after prefill). Scores take the post-vision
queries in chunks, never the [L, L] attention matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from avl.cache.kv_policies import PrefillCompression, _check_keep
from avl.cache.layout import Modality, PromptLayout, packed_index
from avl.cache.policies import LayerScores
from avl.cache.scorers import lengths_of, topk_mask
from avl.models.layers import attention_probs, compute_dtype


def post_vision_rows(layout: PromptLayout) -> Tensor:
    """Mask [B, L] of each sample's valid rows after its last image row (every valid row of a sample
    without an image); raises if a sample ends with its image."""
    index = torch.arange(layout.modality.shape[1], device=layout.modality.device)
    last_image = torch.where(layout.modality == Modality.IMAGE, index, -1).amax(-1)  # [B], -1 without an image
    rows = layout.valid & (index[None] > last_image[:, None])
    for b in (~rows.any(-1)).nonzero().flatten().tolist():
        raise ValueError(f"sample {b} has no prompt row after its last image; VL-Cache scores rows by the attention "
                         "of the post-vision (text after the image) queries, so a prompt must not end with its image")
    return rows


def post_vision_attention(q: Tensor, k: Tensor, valid: Tensor, rows: Tensor, scale: float, threshold: float,
                          chunk: int = 64) -> tuple[Tensor, Tensor]:
    """VL-Cache's statistics of one prefill layer (module docstring): q [B, Hq, L, D] (rotary applied),
    k [B, Hkv, L, D], valid [B, L], post-vision rows [B, L]. Returns the rows' scores [B, Hkv, L]
    (-inf on padding) and the layer's sparsity [B], the share of post-vision attention entries below
    `threshold` times their row's maximum. Queries are taken `chunk` rows at a time."""
    b, heads, length, dim = q.shape
    query_index = packed_index(rows, min_width=1)  # [B, R]
    key_index = torch.arange(length, device=k.device)
    received = torch.zeros(b, heads, length, dtype=compute_dtype(k.dtype), device=k.device)
    below = torch.zeros(b, dtype=torch.long, device=k.device)
    entries = torch.zeros(b, dtype=torch.long, device=k.device)
    for start in range(0, query_index.shape[1], chunk):
        index = query_index[:, start:start + chunk]  # [B, r]
        q_rows = q.gather(2, index.clamp(min=0)[:, None, :, None].expand(-1, heads, -1, dim))
        probs = attention_probs(q_rows, index, k, valid, scale, chunk=chunk)  # [B, Hq, r, L], 0 where unseen
        seen = (key_index <= index[..., None]) & valid[:, None] & (index >= 0)[..., None]  # [B, r, L]
        received += probs.sum(2)
        sparse = (probs < threshold * probs.amax(-1, keepdim=True)) & seen[:, None]
        below += sparse.sum((1, 2, 3))
        entries += seen.sum((1, 2)) * heads
    scores = received.unflatten(1, (k.shape[1], -1)).sum(2).masked_fill(~valid[:, None], float("-inf"))
    return scores, below.double() / entries.double()


def layer_budgets(densities: list[float], length: int, keep: float) -> list[int]:
    """Rows each layer keeps of a prompt of `length` rows: `keep * length * L` split over the L layers
    in proportion to their densities (1 - sparsity), floored, clipped to [1, length]."""
    total, layers = sum(densities), len(densities)
    return [min(length, max(1, int(keep * length * layers * d / total))) for d in densities]


@dataclass(frozen=True)
class VLCache(PrefillCompression):
    """VL-Cache (Tu et al., ICLR 2025; rules, sources and choices in `avl.cache.vl_cache`): every prompt
    row scored by the attention the post-vision (text after the image) queries give it, each layer's
    budget in proportion to its post-vision attention density.

    - keep: the share of prompt rows kept over the whole cache (the paper's cache budget alpha; 0.1
      is its headline setting); layers keep more or less than `keep` of their rows.
    - threshold: the paper's p, 1%: an attention entry below `threshold` times its row's maximum
      counts as sparse.
    """

    keep: float = 0.5
    threshold: float = 0.01

    def __post_init__(self) -> None:
        _check_keep(self.keep)
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < t < 1.0:
            raise ValueError(f"threshold={t!r} is out of range; allowed: a number in (0, 1), the share of a row's "
                             "largest attention entry below which an entry counts as sparse")

    def layer_scores(self, layer: int, q: Tensor, k: Tensor, layout: PromptLayout,
                     scale: float) -> LayerScores | None:
        if self.keep == 1.0:
            return None  # every row kept, nothing to score
        scores, sparsity = post_vision_attention(q, k, layout.valid, post_vision_rows(layout), scale, self.threshold)
        return LayerScores(scores, 1.0 - sparsity, layout.valid)

    def shared_keep(self, layers: list[LayerScores]) -> list[Tensor]:
        densities = torch.stack([layer.weight for layer in layers], dim=1).tolist()  # [B][L]
        budgets = [layer_budgets(d, n, self.keep) for d, n in zip(densities, lengths_of(layers[0].valid))]
        return [topk_mask(layer.scores, [row[i] for row in budgets], layer.valid) for i, layer in enumerate(layers)]
