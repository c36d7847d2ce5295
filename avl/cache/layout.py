"""The prefill sequence described token by token: modality and rotary position of every row."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch
from torch import Tensor


class Modality(IntEnum):
    """What a prompt row holds. SYSTEM = before the first image token; TEXT = the rest."""

    PAD = 0
    SYSTEM = 1
    IMAGE = 2
    TEXT = 3


@dataclass(frozen=True)
class PromptLayout:
    """Rows of a (left-padded, possibly pruned) prefill sequence.

    `modality` [B, L] holds `Modality` values, `positions` [B, L] the rotary position of each
    row. Pruning image rows keeps their original positions, so decode positions continue from
    the last original position + 1.

    `rope_positions` [3, B, L] (Qwen2-VL's M-RoPE (t, h, w) triples), when a family has them, are
    the rotary positions proper; `positions` then holds each row's largest axis, so the last row
    still gives the decode position (the `rope_deltas` rule: max prompt position + 1).
    """

    modality: Tensor  # [B, L] int64
    positions: Tensor  # [B, L] int64
    rope_positions: Tensor | None = None  # [3, B, L] int64

    @classmethod
    def from_prompt(cls, image_mask: Tensor, attention_mask: Tensor,
                    rope_positions: Tensor | None = None) -> PromptLayout:
        """Layout of a tokenised prompt: image_mask, attention_mask [B, L] (left padding), and the
        family's multimodal rotary positions [3, B, L] if it has them (default: 0, 1, ... per sample)."""
        valid = attention_mask.bool()
        image = image_mask & valid
        from_first_image = image.long().cumsum(-1) > 0  # [B, L]
        system = from_first_image[:, -1:] & ~from_first_image  # before the image; none if no image
        modality = torch.full_like(attention_mask, Modality.TEXT, dtype=torch.long)
        modality = modality.masked_fill(system, Modality.SYSTEM).masked_fill(image, Modality.IMAGE)
        modality = modality.masked_fill(~valid, Modality.PAD)
        if rope_positions is None:
            return cls(modality, (valid.long().cumsum(-1) - 1).clamp(min=0))
        if rope_positions.shape != (3, *attention_mask.shape):
            raise ValueError(f"rope_positions has shape {tuple(rope_positions.shape)}; allowed: "
                             f"{(3, *attention_mask.shape)} (3 axes of the prompt's shape)")
        return cls(modality, rope_positions.amax(0), rope_positions)

    @property
    def valid(self) -> Tensor:
        return self.modality != Modality.PAD

    def count(self, modality: Modality) -> Tensor:
        """Rows of that modality per sample, [B]."""
        return (self.modality == modality).sum(-1)

    def select(self, index: Tensor) -> PromptLayout:
        """Rows `index` [B, L'] (-1 = padding) in that order."""
        safe = index.clamp(min=0)
        modality = self.modality.gather(1, safe).masked_fill(index < 0, Modality.PAD)
        rope = None if self.rope_positions is None else self.rope_positions.gather(2, safe.expand(3, -1, -1))
        return PromptLayout(modality, self.positions.gather(1, safe), rope)


def packed_index(keep: Tensor, min_width: int = 0) -> Tensor:
    """Indices of the True entries of keep [B, L], in order, left-padded with -1 to the max count
    (at least `min_width` columns). Left padding keeps every sample's last row last, as the
    prompt layout requires."""
    counts = keep.sum(-1, keepdim=True)  # [B, 1]
    width = max(int(counts.max()), min_width)
    column = width - counts + keep.long().cumsum(-1) - 1  # destination of each kept row
    column = column.masked_fill(~keep, width)  # dropped rows go to a spare last column
    out = torch.full((keep.shape[0], width + 1), -1, dtype=torch.long, device=keep.device)
    out.scatter_(1, column, torch.arange(keep.shape[1], device=keep.device).expand_as(column))
    return out[:, :width]


def top_rows(scores: Tensor, candidates: Tensor, counts: Tensor) -> Tensor:
    """Mask of the `counts` highest-scoring candidate rows along the last dim (ties: earlier row
    first). scores, candidates [..., L]; counts broadcasts against [...] (one count per row set)."""
    ordered = scores.masked_fill(~candidates, float("-inf")).argsort(dim=-1, descending=True, stable=True)
    return candidates & (ordered.argsort(dim=-1) < counts.unsqueeze(-1))
