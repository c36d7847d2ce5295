"""Token pruning inside the language model: PyramidDrop (FastV at several stages).

PyramidDrop (Xing et al., 2024; release: Cooperx521/PyramidDrop, `modeling_llama_pdrop.py`,
`pdrop_rank_drop`) splits the decoder into stages at `layer_list` (default `[8, 16, 24]`) and,
at each stage boundary in prefill, keeps the image tokens the last instruction token attends most
(softmax in float32, mean over heads), in their original order; text tokens are never dropped.
Stage s keeps `int(N_img * lambda ** s)` of the ORIGINAL N_img image tokens (the release's
`image_token_ratio_list` `[0.5, 0.25, 0.125]` with 1.0 prepended: each stage's ratio refers to
the original count, not to the previous stage's rounded count). Decode runs on the shortened cache.

avl runs it through the `prune_keep` hook, as its FastV, which differs from the release in two
ways, both shared with avl's FastV:

- the release ranks with the attention of the first layer of the next stage (its q/k projections
  applied to the hidden states entering it), then drops before that layer runs; avl ranks with
  the attention of the last layer of the ending stage, which has just run, and drops after it;
- the release renumbers positions contiguously after a drop (and shifts decode positions to
  match); avl keeps every token's original rotary position, decode continuing from the last
  original position + 1.

With one stage, `PyramidDrop(layers=(K,), keep=R)` is exactly `FastV(layer=K, keep=R)`.
"""

from __future__ import annotations

from dataclasses import dataclass

from avl.cache.policies import Policy


@dataclass(frozen=True)
class PyramidDrop(Policy):
    """PyramidDrop: after prefill layer `layers[s] - 1` (0-based), keep the hidden states of the top
    `int(keep ** (s + 1) * N_img)` image tokens, scored by the last prompt token's head-mean
    attention in that layer (lambda = `keep`)."""

    layers: tuple[int, ...] = (8, 16, 24)
    keep: float = 0.5

    def __post_init__(self) -> None:
        layers = self.layers
        if (not isinstance(layers, tuple) or not layers
                or any(isinstance(x, bool) or not isinstance(x, int) for x in layers)
                or layers[0] < 1 or any(b <= a for a, b in zip(layers, layers[1:]))):
            raise ValueError(f"layers={layers!r} is out of range; "
                             "allowed: a non-empty tuple of increasing integers >= 1")
        keep = self.keep
        if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < keep <= 1.0:
            raise ValueError(f"keep={keep!r} is out of range; allowed: a number in (0, 1]")

    def prune_keep(self, layer: int) -> float | None:
        if layer + 1 not in self.layers:
            return None
        return self.keep ** (self.layers.index(layer + 1) + 1)

    def check_layers(self, num_layers: int) -> None:
        if self.layers[-1] >= num_layers:
            raise ValueError(f"layers={self.layers!r} is out of range; allowed: stages in [1, {num_layers - 1}]")
