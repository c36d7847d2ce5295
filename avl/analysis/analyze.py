"""`analyze`: a greedy generation on the full cache that records the attention the model runs.

The prefill hands each layer's last-prompt-row probabilities (the row policies score image tokens
with), and each decode step's gathered-attention op its probabilities over the cache slots it
attended, to an `AttentionRecorder` (`CachedDecoder.observer`); nothing is recomputed. With the
full cache nothing is evicted, so the slots of a layer are, in order: the system rows, the image
rows, the other prompt rows after the first image row, then the generated tokens' rows.

Cross-attention blocks (Llama-3.2-Vision) hand the recorder their query row's probabilities over
the image feature rows, from the same q, K and mask their attention ran with: the last prompt
row's in prefill, each token's in decode. Untrimmed, a layer's slots are the feature rows in order
(image, tile, patch).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from avl.analysis.report import AttentionReport, build_cross_report, build_report
from avl.cache.layout import Modality, PromptLayout
from avl.cache.policies import Full
from avl.inputs import check_generate_inputs
from avl.models.decoder import AttentionObserver, CachedDecoder, CrossAttentionBlock


class AttentionRecorder:
    """Collects A[t, l] of a batch-1 generation on the full cache, as the decoder runs.

    `attention[l][t]`: the head-mean probabilities of step t's query row in self-attention layer l
    over the sequence rows 0 .. L + t - 1 (L prompt rows), float64. `cross_attention[l][t]`: those of
    cross-attention layer l over its N image feature rows (0 on the rows it may not attend), and
    `cross_allowed` [N] the rows it may attend (the same for every layer and step of one generation).
    """

    def __init__(self) -> None:
        self.layout: PromptLayout | None = None
        self.attention: dict[int, list[Tensor]] = {}
        self.cross_attention: dict[int, list[Tensor]] = {}
        self.cross_allowed: Tensor | None = None
        self._slot_rows = torch.empty(0, dtype=torch.long)

    def prefill(self, layer: int, layout: PromptLayout, probs: Tensor) -> None:
        if self.layout is None:
            self.layout = layout
            modality = layout.modality[0]
            # the prompt's slots: system rows, image rows, then the other rows, each in sequence order
            self._slot_rows = torch.cat([(modality == m).nonzero()[:, 0] for m in
                                         (Modality.SYSTEM, Modality.IMAGE, Modality.TEXT)]).cpu()
        self.attention[layer] = [probs[0].detach().to(torch.float64).cpu()]

    def decode(self, layer: int, idx: Tensor, probs: Tensor) -> None:
        steps = self.attention[layer]
        prompt_rows = self._slot_rows.numel()
        rows = prompt_rows + len(steps)  # the rows up to and including this step's own
        slots = idx[0, 0].long().cpu()  # the full cache: every KV head attends the same slots
        attended = slots >= 0
        if int(attended.sum()) != rows or bool((idx[0] != idx[0, :1]).any()):
            raise RuntimeError(f"layer {layer}: the decode step attended {int(attended.sum())} slots per head "
                               f"(or different ones per head) where the full cache holds {rows} rows")
        slots = slots[attended]
        row_of_slot = torch.where(slots < prompt_rows, self._slot_rows[slots.clamp(max=prompt_rows - 1)], slots)
        a = torch.zeros(rows, dtype=torch.float64)
        a[row_of_slot] = probs[0].detach().to(torch.float64).mean(0).cpu()[attended]
        steps.append(a)

    def cross(self, layer: int, allowed: Tensor, probs: Tensor) -> None:
        allowed = allowed[0].cpu()
        if self.cross_allowed is None:
            self.cross_allowed = allowed
        elif not torch.equal(allowed, self.cross_allowed):
            raise RuntimeError(f"cross-attention layer {layer} attended {int(allowed.sum())} of {allowed.numel()} "
                               f"feature slots where the generation's first one attended "
                               f"{int(self.cross_allowed.sum())} of {self.cross_allowed.numel()} (a trimmed cache?)")
        self.cross_attention.setdefault(layer, []).append(probs[0].detach().to(torch.float64).mean(0).cpu())

    def steps(self) -> list[Tensor]:
        """A[t] [layers, L + t] for each recorded step t (self-attention layers in model order)."""
        return _by_step(self.attention)

    def cross_steps(self) -> list[Tensor]:
        """A_x[t] [cross-attention layers, N] for each recorded step t (layers in model order)."""
        return _by_step(self.cross_attention)


def _by_step(attention: dict[int, list[Tensor]]) -> list[Tensor]:
    """Per step t, the layers' rows of step t stacked in layer order."""
    per_layer = [attention[layer] for layer in sorted(attention)]
    return [torch.stack([steps[t] for steps in per_layer]) for t in range(len(per_layer[0]))] if per_layer else []


def language_decoder(model: nn.Module) -> CachedDecoder:
    """The model's `CachedDecoder` (its language model). Raises ValueError when it has none."""
    decoders = [m for m in model.modules() if isinstance(m, CachedDecoder)]
    if len(decoders) != 1:
        raise ValueError(f"{type(model).__name__} has {len(decoders)} cached decoders; the analysis needs a model "
                         "built on one avl CachedDecoder (avl.load)")
    return decoders[0]


@contextmanager
def observing(model: nn.Module, observer: AttentionObserver) -> Iterator[None]:
    """Set `observer` on the model's decoder for the duration of the block (eager runs only)."""
    decoder = language_decoder(model)
    previous = decoder.observer
    decoder.observer = observer
    try:
        yield
    finally:
        decoder.observer = previous  # nested blocks restore the outer observer


def _check_ratio(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ValueError(f"{name}={value!r} is invalid; allowed: a ratio in (0, 1]")


@torch.inference_mode()
def analyze(model: nn.Module, input_ids: Tensor, pixel_values: Tensor | None = None,
            attention_mask: Tensor | None = None, max_new_tokens: int = 16, top: float = 0.3, mass: float = 0.8,
            **image_inputs: Tensor) -> AttentionReport:
    """Attention analysis of one greedy generation of exactly `max_new_tokens` tokens (no stop
    tokens, so T = max_new_tokens steps) on the full cache, batch 1, unpadded.

    `top` is the PPCI's top share of image rows, `mass` the concentration's attention mass;
    `image_inputs` are the family's other image tensors, as for `avl.generate`.

    Families whose image rows are in the sequence (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen-VL,
    Qwen2-VL, Qwen2.5-VL): the report over the decoder layers' self-attention (`attention="self"`);
    image rows are the image-token rows (Qwen2-VL's vision start / end tokens are text rows).
    Llama-3.2-Vision, whose image features are cross-attended: the same quantities over its
    cross-attention layers and the feature rows (tiles x patches) its query rows attend
    (`attention="cross"`, `modal_shares` None); see `avl.analysis.report`.
    """
    _check_ratio("top", top)
    _check_ratio("mass", mass)
    policy = Full()
    check_generate_inputs(model, input_ids, attention_mask, pixel_values, policy, None, max_new_tokens, 1.0, 1.0)
    if input_ids.shape[0] != 1:
        raise ValueError(f"input_ids hold {input_ids.shape[0]} samples; the analysis takes one (batch 1)")
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        raise ValueError("attention_mask has padding; the analysis takes one unpadded prompt")
    limit = getattr(model, "max_positions", None)
    if limit is not None and input_ids.shape[1] + max_new_tokens > limit:
        raise ValueError(f"the prompt length {input_ids.shape[1]} + max_new_tokens={max_new_tokens} exceeds the "
                         f"model's max_position_embeddings={limit}")
    decoder = language_decoder(model)
    cross_layers = [i for i, block in enumerate(decoder.layers) if isinstance(block, CrossAttentionBlock)]
    if cross_layers and pixel_values is None:
        raise ValueError(f"{type(model).__name__} got no pixel_values: the analysis of its cross-attention "
                         "layers needs an image")
    recorder = AttentionRecorder()
    tokens: list[int] = []
    with observing(model, recorder):
        logits, cache = model.prefill(input_ids, torch.ones_like(input_ids), pixel_values, policy,
                                      max_new_tokens - 1, **image_inputs)
        for t in range(max_new_tokens):
            token = logits.argmax(-1)
            tokens.append(int(token[0]))
            if t < max_new_tokens - 1:
                logits = model.decode(token, cache)
    if cross_layers:
        return build_cross_report(recorder.cross_steps(), recorder.cross_allowed, tokens, top, mass, cross_layers)
    return build_report(recorder.steps(), recorder.layout.modality[0].cpu(), tokens, top, mass)
