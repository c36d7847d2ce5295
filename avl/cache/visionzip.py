"""VisionZip: fewer image tokens before the language model, chosen in the vision tower.

Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models" (CVPR 2025);
release dvlab-research/VisionZip (`visionzip/clip_encoder.py`, `visionzip/utils.py`). The rule, on
the CLIP layer whose hidden states LLaVA takes (layer -2), for each image of 1 + P tokens:

- dominant: the [CLS] token plus the `dominant - 1` patches with the largest [CLS] attention
  summed over heads (`visionzip(model, dominant=54)` passes 53 to the tower: CLS is one of the
  dominant tokens), in their original order, CLS first;
- contextual: the remaining R = 1 + P - dominant tokens are compared by that layer's keys
  averaged over heads, L2-normalised. Every `max(1, R // contextual)`-th remaining token (from the
  first, `contextual` of them) is a target; every other remaining token goes to the target of
  highest cosine similarity (argmax, first on ties), and each contextual token is its target's
  hidden state PLUS the mean of the tokens assigned to it (the target itself is not in that mean:
  the release's rule, kept as it is);
- the output is `dominant + contextual` tokens: the dominant tokens, then the contextual ones.
  LLaVA-1.5 with VisionZip projects all of them, the CLS token included (the "default" feature
  strategy would drop CLS; the release's tower returns it among the dominant tokens).

Release defaults: `dominant=191, contextual=30`; its README's 64-token setting is 54 + 10. The
release's attention is the eager CLIP softmax in the model dtype; avl's tower computes the [CLS]
row in at least float32 (`ClipVisionTower(..., cls_attention=True)`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from avl.cache.policies import FeaturePolicy
from avl.models.clip import ClsAttention


@dataclass(frozen=True)
class VisionZipSelection:
    """The tokens VisionZip passes on, per image."""

    features: Tensor  # [N, dominant + contextual, C]: dominant tokens in order, then contextual tokens
    dominant: Tensor  # [N, dominant] token indices (0 = CLS), increasing
    contextual: Tensor  # [N, contextual] token indices of the contextual targets, increasing
    group: Tensor  # [N, 1 + P] contextual group (0..contextual-1) of each token, -1 for dominant tokens


@dataclass(frozen=True)
class VisionZip(FeaturePolicy):
    """VisionZip's settings: `dominant` tokens (CLS included) and `contextual` merged tokens per
    image, from the vision layer `layer` (the layer LLaVA takes its features from, -2).

    A feature policy of LLaVA-1.5 and LLaVA-NeXT (`generate(..., feature_policy=VisionZip())`): the
    processor expands each image placeholder to the full count as usual, and the model compacts the
    prompt in prefill: each image gets one row per selected token (dominant, then contextual,
    projected; LLaVA-NeXT: `dominant + contextual` per anyres tile, packed by
    `anyres_visionzip_tokens`), the other rows are dropped before the language model, positions
    renumbered contiguously, as the release's shorter prompt has them. The sequence policy then sees
    that many image rows per image (its ratios refer to that count). LLaVA-OneVision refuses it:
    SigLIP has no [CLS] token to rank patches by, and the release has no rule for such towers.
    """

    in_sequence = True

    dominant: int = 54
    contextual: int = 10
    layer: int = -2

    def __post_init__(self) -> None:
        for name, value in (("dominant", self.dominant), ("contextual", self.contextual)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is out of range; allowed: an integer >= 1")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int):
            raise ValueError(f"layer={self.layer!r} is not supported; allowed: a vision layer index (an int)")

    def select(self, hidden: Tensor, attention: ClsAttention) -> VisionZipSelection:
        return visionzip_select(hidden, attention, self.dominant, self.contextual)


def visionzip_select(hidden: Tensor, attention: ClsAttention, dominant: int, contextual: int) -> VisionZipSelection:
    """VisionZip's selection (module docstring) on one CLIP layer's output hidden [N, 1 + P, C]
    and that layer's `ClsAttention`. Needs dominant + contextual <= 1 + P."""
    n, tokens, _ = hidden.shape
    if dominant + contextual > tokens:
        raise ValueError(f"dominant={dominant} + contextual={contextual} exceeds the {tokens} tokens of an image "
                         f"(CLS + {tokens - 1} patches); allowed: dominant + contextual <= {tokens}")
    patch_scores = attention.probs[:, :, 1:].sum(1)  # [N, P]
    top = patch_scores.topk(dominant - 1, dim=1).indices + 1
    is_dominant = torch.zeros(n, tokens, dtype=torch.bool, device=hidden.device)
    is_dominant[:, 0] = True
    is_dominant.scatter_(1, top, True)
    order = torch.arange(tokens, device=hidden.device).expand(n, -1)
    dominant_index = order[is_dominant].view(n, dominant)
    rest_index = order[~is_dominant].view(n, tokens - dominant)  # [N, R]

    keys = attention.keys.mean(1)  # [N, 1 + P, D]
    rest_keys = F.normalize(keys.gather(1, rest_index[..., None].expand(-1, -1, keys.shape[-1])), dim=-1, eps=0.0)
    rest = rest_index.shape[1]
    targets = torch.arange(0, rest, max(1, rest // contextual), device=hidden.device)[:contextual]
    is_target = torch.zeros(rest, dtype=torch.bool, device=hidden.device)
    is_target[targets] = True
    similarity = rest_keys[:, ~is_target] @ rest_keys[:, targets].transpose(1, 2)  # [N, R - c, c]
    assigned = similarity.argmax(dim=2)  # [N, R - c]
    one_hot = F.one_hot(assigned, contextual).to(hidden.dtype)  # [N, R - c, c]
    rest_hidden = hidden.gather(1, rest_index[..., None].expand(-1, -1, hidden.shape[-1]))  # [N, R, C]
    counts = one_hot.sum(1).clamp(min=1)[..., None]  # [N, c, 1]
    merged = rest_hidden[:, targets] + one_hot.transpose(1, 2) @ rest_hidden[:, ~is_target] / counts

    group = torch.full((n, tokens), -1, dtype=torch.long, device=hidden.device)
    rest_group = torch.empty(n, rest, dtype=torch.long, device=hidden.device)
    rest_group[:, targets] = torch.arange(contextual, device=hidden.device)
    rest_group[:, ~is_target] = assigned
    group.scatter_(1, rest_index, rest_group)
    dominant_hidden = hidden.gather(1, dominant_index[..., None].expand(-1, -1, hidden.shape[-1]))
    return VisionZipSelection(torch.cat([dominant_hidden, merged], dim=1), dominant_index, rest_index[:, targets],
                              group)


def anyres_visionzip_tokens(features: Tensor, dominant: Tensor, rows: int, cols: int, side: int) -> Tensor:
    """One LLaVA-NeXT image's VisionZip tokens [(1 + rows * cols) * (D + C), C'] from its tiles' selected
    features [1 + rows * cols, D + C, C'] (base tile first, then the grid row by row; per tile the
    D dominant tokens in order, CLS first, then the C contextual ones) and their dominant token
    indices [1 + rows * cols, D] (0 = CLS, patch p at 1 + p of a `side` x `side` tile), in the order
    of the release's LLaVA-NeXT path (`llava_arch.py`, `restore_image_features_sorted`, spatial_unpad):

    - the base tile's D + C tokens as they are;
    - the grid tiles' dominant patches in raster order of the grid's whole feature map (rows of
      tiles, then rows of patches): no padding cut, no `image_newline` (the release drops both);
    - the grid tiles' CLS tokens, tile by tile;
    - the grid tiles' contextual tokens, tile by tile.

    The release hard-codes CLIP-L/336's 24 x 24 patches per tile; `side` is the tower's own.
    """
    base, grid, index = features[0], features[1:], dominant[1:]
    d = index.shape[1]
    tile = torch.arange(grid.shape[0], device=features.device)[:, None]
    patch = index[:, 1:] - 1  # [G, D - 1] patch number inside its tile, row by row
    row = (tile // cols) * side + patch // side  # the patch's row and column in the grid's feature map
    column = (tile % cols) * side + patch % side
    raster = (row * cols * side + column).flatten().argsort()
    return torch.cat([base, grid[:, 1:d].flatten(0, 1)[raster], grid[:, 0], grid[:, d:].flatten(0, 1)])
