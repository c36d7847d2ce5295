"""Qwen2-VL / Qwen2.5-VL on the cached decoder: `avl.generate` against transformers' own generation,
and every cache policy batched against each sample alone.

References (float64, tiny checkpoints written by transformers):
- tokens: `Qwen2VLForConditionalGeneration.generate` / `Qwen2_5_VLForConditionalGeneration.generate`
  (greedy); its logits are float32 (generate casts them), so they agree to float32 rounding;
- logits of every step in float64: transformers' dense forward over prompt + generated tokens (the
  M-RoPE positions of generated tokens are the `rope_deltas` rule, see test_qwen2_vl_model.py).
  With `set_reference_casts()` avl agrees to ~1e-13 (1e-10 asserted); plain float64 differs by
  transformers' float32 RMSNorm islands, measured ~5e-6 over 12 steps (1e-4 asserted).
A decode position off by one, or an M-RoPE table instead of the 1-D rotary in decode, moves logits
by O(1).
"""

from __future__ import annotations

import pytest
import torch

import avl
from avl.cache.kv_policies import AdaKV, KNorm, ObservedAttention, PyramidKV, RandomEviction, SnapKV
from avl.cache.layout import Modality, PromptLayout
from tiny_qwen2_vl import IMAGE_ID, VIDEO_ID, build_hf, image_prompt, left_pad, random_pixels

FAMILIES = ("qwen2_vl", "qwen2_5_vl")
STEPS = 12

# per sample: text before, image grids (t, h, w in patches), text after; different lengths and sizes,
# two images in one prompt, and a text-only prompt
SAMPLES = [
    ([5, 6], [[1, 4, 10]], [7, 8, 9, 10]),
    ([5, 6, 11, 12, 13], [[1, 12, 6]], [7, 8, 9]),
    ([21, 22, 23], [[1, 8, 8], [1, 6, 14]], [24, 25, 26, 27, 28, 29]),
    ([31, 32, 33, 34, 35, 36], [], [37]),
]

POLICIES = [
    avl.Full(),
    avl.AVL(0.45, 0.30, 3, 0.9, 0.5),
    avl.AVL(secondary=0.5, core=0.25, refresh_every=2),
    avl.AVL(text_keep=0.3, text_min_budget=2),
    avl.AVL(prefill_keep=0.5),
    avl.FastV(layer=1, keep=0.5),
    avl.H2O(budget=0.5),
    avl.StreamingLLM(sinks=2, window=8, positions="original"),  # "shifted" is refused: no M-RoPE rule
    # the kvpress-pinned policies, VL-Cache and PyramidDrop (windows shorter than the shortest prompt)
    SnapKV(0.5, window_size=4, kernel_size=3),
    PyramidKV(0.5, window_size=4, kernel_size=3, beta=2),
    AdaKV(SnapKV(0.5, window_size=4, kernel_size=3), alpha_safeguard=0.2),
    KNorm(0.6),
    ObservedAttention(0.5),
    RandomEviction(0.5, seed=1),
    avl.VLCache(0.5),
    avl.PyramidDrop(layers=(1, 2), keep=0.5),
]


def test_shifted_streaming_positions_are_refused_with_the_reason(deep_model):
    with pytest.raises(ValueError, match="M-RoPE.*use positions='original'"):
        avl.generate(deep_model, **inputs(SAMPLES[:1]), policy=avl.StreamingLLM(sinks=2, window=8), max_new_tokens=2)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: intra-op threads only add overhead, and on a shared 2-core machine they stall."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    """transformers' model and avl's, from the same 2-layer checkpoint directory. The LM head rows of
    the image and video ids are zeroed (logit 0, far below the top logits), so that greedy decoding
    does not emit them: the dense reference would read a generated image id as an image."""
    directory = tmp_path_factory.mktemp(request.param)
    hf = build_hf(directory, request.param)
    with torch.no_grad():
        hf.lm_head.weight[[IMAGE_ID, VIDEO_ID]] = 0.0
    hf.save_pretrained(directory)
    return hf, avl.load(directory)


@pytest.fixture(scope="module", params=FAMILIES)
def deep_model(request, tmp_path_factory):
    """A 3-layer checkpoint, so that A-VL's P (after layer index 1) changes what layer 2 sees."""
    directory = tmp_path_factory.mktemp(request.param + "_deep")
    build_hf(directory, request.param, seed=4, text={"num_hidden_layers": 3})
    return avl.load(directory)


def inputs(samples):
    """Left-padded inputs of some of SAMPLES; each sample's pixels are its own, batched or alone."""
    ids, mask = left_pad([image_prompt(before, grids, after) for before, grids, after in samples])
    with_images = [(torch.tensor(grids), SAMPLES.index(sample)) for sample in samples if (grids := sample[1])]
    if not with_images:
        return dict(input_ids=ids, attention_mask=mask)
    pixels = torch.cat([random_pixels(grid, i) for grid, i in with_images])
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                image_grid_thw=torch.cat([grid for grid, _ in with_images]))


def reference(hf, batch):
    """transformers' greedy tokens [B, STEPS] and float32 logits (generate), and float64 logits of the
    same steps from its dense forward over prompt + generated tokens."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    out = hf.generate(**batch, mm_token_type_ids=(ids == IMAGE_ID).int(), max_new_tokens=STEPS,
                      min_new_tokens=STEPS, do_sample=False, output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[:, ids.shape[1]:]
    assert not bool((tokens == IMAGE_ID).any())  # a generated image id would be read as an image by forward
    full_mask = torch.cat([mask, torch.ones_like(tokens)], dim=1)
    dense = hf(input_ids=out.sequences, attention_mask=full_mask, pixel_values=batch["pixel_values"],
               image_grid_thw=batch["image_grid_thw"], mm_token_type_ids=(out.sequences == IMAGE_ID).int()).logits
    return tokens, torch.stack(out.logits, dim=1), dense[:, ids.shape[1] - 1: -1]


@pytest.mark.parametrize("samples", [SAMPLES[:1], SAMPLES[:2]], ids=["one", "padded_pair"])
@torch.inference_mode()
def test_greedy_generation_matches_transformers(checkpoint, samples):
    hf, model = checkpoint
    batch = inputs(samples)
    tokens, logits32, logits64 = reference(hf, batch)
    assert len(set(tokens.flatten().tolist())) > 3  # the steps are not one repeated token
    try:
        exact = avl.generate(model.set_reference_casts(), **batch, max_new_tokens=STEPS, output_logits=True)
    finally:
        model.set_reference_casts(False)
    plain = avl.generate(model, **batch, max_new_tokens=STEPS, output_logits=True)
    for out in (exact, plain):
        assert out.tokens.tolist() == tokens.tolist()
        assert out.logits.dtype == torch.float64 and out.logits.shape == logits64.shape
    assert (exact.logits - logits64).abs().max() <= 1e-10
    assert (exact.logits.float() - logits32).abs().max() <= 1e-5  # float32 rounding of logits ~7
    assert (plain.logits - logits64).abs().max() <= 1e-4
    assert logits64.abs().max() > 1.0


@torch.inference_mode()
def test_avl_with_every_ratio_one_equals_full(deep_model):
    batch = inputs(SAMPLES)
    full = avl.generate(deep_model, **batch, max_new_tokens=STEPS, output_logits=True)
    ones = avl.generate(deep_model, **batch, policy=avl.AVL(1.0, 1.0, 2, 1.0, 1.0), max_new_tokens=STEPS,
                        output_logits=True)
    assert ones.tokens.tolist() == full.tokens.tolist()
    assert (ones.logits - full.logits).abs().max() <= 1e-10  # same rows, summed in another slot order


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: repr(p)[:60])
@torch.inference_mode()
def test_batch_equals_each_sample_alone(deep_model, policy):
    batched = avl.generate(deep_model, **inputs(SAMPLES), policy=policy, max_new_tokens=STEPS, output_logits=True)
    for i, sample in enumerate(SAMPLES):
        alone = avl.generate(deep_model, **inputs([sample]), policy=policy, max_new_tokens=STEPS, output_logits=True)
        assert batched.tokens[i].tolist() == alone.tokens[0].tolist(), i
        assert (batched.logits[i] - alone.logits[0]).abs().max() <= 1e-8, i


@torch.inference_mode()
def test_image_rows_are_the_image_pad_tokens_and_policies_count_them(deep_model):
    """A-VL keeps int(0.5 * N_img) image rows per sample and layer of each sample's own N_img = the
    `<|image_pad|>` count (10, 18, 16 + 21, 0); vision start / end tokens are text."""
    batch = inputs(SAMPLES)
    n_image = [int(n) for n in (batch["input_ids"] == IMAGE_ID).sum(-1)]
    assert n_image == [10, 18, 37, 0]
    kwargs = dict(max_new_tokens=2)
    full = avl.generate(deep_model, **batch, **kwargs).stats
    half = avl.generate(deep_model, **batch, policy=avl.AVL(secondary=0.5, core=0.25, refresh_every=2), **kwargs).stats
    for a, b in zip(full.layers, half.layers):
        assert a.stored_rows - b.stored_rows == sum(n - n // 2 for n in n_image)


def test_layout_rows_keep_their_mrope_triples_when_selected():
    """`positions` is each row's largest axis (so the last row + 1 is the rope_deltas decode position);
    `select` (a prefill drop) carries the kept rows' triples unchanged."""
    rope = torch.tensor([[[0, 0, 1, 1, 1, 1, 3]], [[0, 0, 1, 1, 2, 2, 3]], [[0, 0, 1, 2, 1, 2, 3]]])  # [3, 1, 7]
    image = torch.tensor([[False, False, True, True, True, True, False]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1]])
    layout = PromptLayout.from_prompt(image, mask, rope)
    assert layout.positions.tolist() == [[0, 0, 1, 2, 2, 2, 3]]
    assert layout.modality.tolist() == [[Modality.PAD, Modality.SYSTEM, *[Modality.IMAGE] * 4, Modality.TEXT]]
    kept = layout.select(torch.tensor([[-1, 1, 3, 5, 6]]))
    assert kept.rope_positions.tolist() == [[[0, 0, 1, 1, 3]], [[0, 0, 1, 2, 3]], [[0, 0, 2, 2, 3]]]
    assert kept.positions.tolist() == [[0, 0, 2, 2, 3]]
    with pytest.raises(ValueError, match="rope_positions has shape"):
        PromptLayout.from_prompt(image, mask, rope[:2])


@pytest.fixture(scope="module")
def qwen2_vl_deep(tmp_path_factory):
    """The 3-layer Qwen2-VL checkpoint alone: the two families share the language model, so one compiles."""
    directory = tmp_path_factory.mktemp("qwen2_vl_compiled")
    build_hf(directory, "qwen2_vl", seed=4, text={"num_hidden_layers": 3})
    return avl.load(directory)


@pytest.mark.slow
def test_compiled_decode_equals_eager_without_graph_breaks(qwen2_vl_deep):
    """Image grids only shape prefill; decode compiles to one graph per step kind."""
    from torch._dynamo.utils import counters

    deep_model = qwen2_vl_deep

    kwargs = dict(**inputs(SAMPLES), max_new_tokens=9, policy=avl.AVL(0.45, 0.30, 3, 0.9, 0.5), output_logits=True)
    eager = avl.generate(deep_model, **kwargs)
    torch._dynamo.reset()
    counters.clear()
    compiled = avl.generate(deep_model, compile=True, **kwargs)
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 2  # ordinary and refresh steps
    assert compiled.tokens.tolist() == eager.tokens.tolist()
    assert (compiled.logits - eager.logits).abs().max() <= 1e-5
