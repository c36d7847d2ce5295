"""Generation: prefill once, then one decode step per token (optionally compiled)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import Tensor

from avl.cache.modal_cache import CacheStats, DecodeStep, ModalCache
from avl.cache.policies import FeaturePolicy, Full, Policy
from avl.inputs import check_generate_inputs
from avl.models.layers import compute_dtype


class Generative(Protocol):
    """What `generate` needs of a model: a prefill building the cache, a decode step using it.
    A model whose images need more than pixels (LLaVA-NeXT's `image_sizes`, Llama-3.2-Vision's
    aspect ratios and cross-attention mask) takes them as keyword arguments of `prefill`.
    `max_positions` is the longest sequence its position embedding supports."""

    max_positions: int

    def prefill(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor | None, policy: Policy,
                new_tokens: int, feature_policy: FeaturePolicy | None = None,
                **image_inputs: Tensor) -> tuple[Tensor, ModalCache]: ...

    def decode(self, token: Tensor, cache: ModalCache, step: DecodeStep | None = None) -> Tensor: ...


@dataclass
class Timings:
    """Wall-clock seconds of a generation (synchronised on CUDA): `prefill_s` is the time to the
    first token's logits, `step_s` one entry per decode step (time per output token after the first)."""

    prefill_s: float = 0.0
    step_s: list[float] = field(default_factory=list)


@dataclass
class GenerationOutput:
    """tokens [B, new] (after a sample's EOS: `pad_token_id`, or the EOS id); logits [B, new, vocab]
    (next-token logits at each step, float32, or float64 for a float64 model) when asked; stats: the
    cache accounting after the last step; timings: prefill and per-step wall-clock seconds."""

    tokens: Tensor
    logits: Tensor | None
    stats: CacheStats
    timings: Timings


def compile_decode(model: Generative) -> Callable[[Tensor, ModalCache, DecodeStep], Tensor]:
    """`model.decode` under `torch.compile(fullgraph=True)`: one graph for ordinary steps and one for
    refresh steps. The steps' evictable widths grow by one row at a time, so they are compiled as
    symbolic sizes (`dynamic=True`) rather than one graph per width; pass `cache.next_step()`."""
    return torch.compile(model.decode, fullgraph=True, dynamic=True)


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def sample_next(logits: Tensor, do_sample: bool, temperature: float, top_p: float,
                generator: torch.Generator | None) -> Tensor:
    """Greedy argmax, or sampling with temperature and nucleus (top-p) filtering: logits [B, V] -> [B]."""
    if not do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # drop a token once the mass before it already reaches top_p; the most likely token always stays
    outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)
    return order.gather(-1, choice)[:, 0]


@torch.inference_mode()
def generate(
    model: Generative,
    input_ids: Tensor,
    pixel_values: Tensor | None = None,
    attention_mask: Tensor | None = None,
    policy: Policy | None = None,
    feature_policy: FeaturePolicy | None = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    output_logits: bool = False,
    compile: bool = False,
    generator: torch.Generator | None = None,
    on_token: Callable[[Tensor], None] | None = None,
    **image_inputs: Tensor,
) -> GenerationOutput:
    """Generate up to `max_new_tokens` tokens per sample.

    input_ids / attention_mask [B, L] are left-padded (0 in the mask on padding); pixel_values
    [N_images, 3, H, W] in the order the image placeholders appear. `image_inputs` are the other
    image tensors of a family, by transformers' names, as its processor returns them: LLaVA-NeXT's
    `image_sizes` [N_images, 2] (height, width, with pixel_values [N_images, tiles, 3, H, W]);
    LLaVA-OneVision's `image_sizes` and `batch_num_images` (the images of each prompt that has any);
    Llama-3.2-Vision's `aspect_ratio_ids`, `aspect_ratio_mask`, `cross_attention_mask`.
    `policy` (default `Full()`) decides what the cache keeps; `feature_policy` (e.g. `Trim`) which
    image features enter the cross-attention layers of a model that has them. With `compile=True`
    the decode step runs under `torch.compile(fullgraph=True)` (`compile_decode`): one graph, plus a
    second one for a policy's refresh steps.
    `on_token`, if given, is called with each step's tokens [B] as soon as they are chosen, before
    the next decode step (streaming; `avl.processing.TextStreamer` turns them into printable text).
    Generation stops early once every sample has produced an EOS id.
    """
    policy = policy if policy is not None else Full()
    check_generate_inputs(model, input_ids, attention_mask, pixel_values, policy, feature_policy, max_new_tokens,
                          temperature, top_p)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    eos = torch.tensor([] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int)
                       else list(eos_token_id), device=input_ids.device, dtype=torch.long)
    fill = pad_token_id if pad_token_id is not None else (int(eos[0]) if len(eos) else 0)

    longest = int(attention_mask.sum(-1).max())
    limit = getattr(model, "max_positions", None)
    if limit is not None and longest + max_new_tokens > limit:
        raise ValueError(f"the prompt length {longest} + max_new_tokens={max_new_tokens} = {longest + max_new_tokens} "
                         f"exceeds the model's max_position_embeddings={limit}")
    timings = Timings()
    start = _clock(input_ids.device)
    logits, cache = model.prefill(input_ids, attention_mask, pixel_values, policy, max_new_tokens - 1,
                                  feature_policy=feature_policy, **image_inputs)
    timings.prefill_s = _clock(input_ids.device) - start
    step: Callable[..., Tensor] = compile_decode(model) if compile else model.decode
    tokens, all_logits = [], []
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for t in range(max_new_tokens):
        if output_logits:
            all_logits.append(logits.to(compute_dtype(logits.dtype)))
        token = sample_next(logits, do_sample, temperature, top_p, generator).masked_fill(done, fill)
        tokens.append(token)
        if on_token is not None:
            on_token(token)
        done |= torch.isin(token, eos)
        if t == max_new_tokens - 1 or bool(done.all()):
            break
        start = _clock(input_ids.device)
        logits = step(token, cache, cache.next_step())
        timings.step_s.append(_clock(input_ids.device) - start)
    return GenerationOutput(
        tokens=torch.stack(tokens, dim=1),
        logits=torch.stack(all_logits, dim=1) if output_logits else None,
        stats=cache.stats(),
        timings=timings,
    )
