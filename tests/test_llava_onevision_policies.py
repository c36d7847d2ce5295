"""Every cache policy on LLaVA-OneVision, whose samples have different image-token counts.

A left-padded batch mixes prompt lengths, image sizes and aspect ratios (anyres grids of 1 x 2 tiles
with padding rows cut off and of 2 x 2 tiles, `image_newline` after each row) and a two-image prompt
(one tile per image, `batch_num_images`); each sample must generate exactly what it generates alone,
under every policy. The reference for a batch row is the same model run on that sample alone, so a
policy that mixes samples, miscounts a sample's own image rows or mis-handles left padding fails.
"""

from __future__ import annotations

import pytest
import torch

import avl
from avl.models.llava_onevision import LlavaOnevision, LlavaOnevisionConfig
from tiny_llava import IMAGE_TOKEN, POLICIES, left_pad, prompt_ids

STEPS = 12
TILE = 26
RAW_CONFIG = {
    "model_type": "llava_onevision", "image_token_index": IMAGE_TOKEN,
    "image_grid_pinpoints": [[TILE, 2 * TILE], [2 * TILE, TILE], [2 * TILE, 2 * TILE]],
    "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                      "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": TILE, "patch_size": 6},
    "text_config": {"model_type": "qwen2", "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128,
                    "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
                    "max_position_embeddings": 1024},
}
# per sample: its images' (height, width), text tokens before the first image / between / after
SAMPLES = [
    ([(30, 90)], (2, 0, 4)),
    ([(60, 20), (20, 40)], (7, 3, 9)),
    ([(40, 40)], (4, 0, 2)),
]
# the A-VL setting, beside tiny_llava's one policy of each kind
PAPER_AVL = avl.AVL(secondary=0.45, core=0.30, refresh_every=3, prefill_keep=0.9, text_keep=0.5)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: intra-op threads only add overhead, and on a shared 2-core machine they stall."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> LlavaOnevision:
    """A tiny random float64 LLaVA-OneVision (Qwen2 with q/k/v biases, 2 KV heads for 4 query heads)."""
    torch.manual_seed(0)
    net = LlavaOnevision(LlavaOnevisionConfig.from_dict(RAW_CONFIG)).to(torch.float64).eval()
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
        net.image_newline.normal_(0, 1.0)
    return net


def image_counts(model: LlavaOnevision, sizes: list[tuple[int, int]]) -> list[int]:
    """Image tokens of one prompt's images (several images in a prompt: one tile each)."""
    return [model.num_image_tokens(size, multi_image=len(sizes) > 1) for size in sizes]


def sample_prompt(model: LlavaOnevision, sizes: list[tuple[int, int]], lengths: tuple[int, int, int],
                  seed: int) -> list[int]:
    before, between, after = lengths
    counts = image_counts(model, sizes)
    ids = prompt_ids(before, after, counts[0], seed)
    if len(sizes) == 2:  # insert the second image after `between` text tokens following the first
        cut = ids.index(IMAGE_TOKEN) + counts[0] + between
        ids = ids[:cut] + [IMAGE_TOKEN] * counts[1] + ids[cut:]
    return ids


def batch(model: LlavaOnevision):
    """Prompts, pixel_values [4 images, 5 tiles, 3, 26, 26], image_sizes [4, 2], batch_num_images [3]."""
    prompts = [sample_prompt(model, sizes, lengths, seed) for seed, (sizes, lengths) in enumerate(SAMPLES)]
    sizes = torch.tensor([size for image_sizes, _ in SAMPLES for size in image_sizes])
    per_prompt = torch.tensor([len(image_sizes) for image_sizes, _ in SAMPLES])
    generator = torch.Generator().manual_seed(9)
    pixel_values = torch.randn(len(sizes), 5, 3, TILE, TILE, dtype=torch.float64, generator=generator)
    return prompts, pixel_values, sizes, per_prompt


def batch_kwargs(model: LlavaOnevision, **kwargs) -> dict:
    prompts, pixel_values, sizes, per_prompt = batch(model)
    ids, mask = left_pad(prompts)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, image_sizes=sizes,
                batch_num_images=per_prompt, **kwargs)


def test_samples_have_different_image_token_counts(model):
    """1 x 2 grid (4 x 8 features, two padding rows cut), two single tiles, 2 x 2 grid: base 16 + h * (w + 1)
    each, 16 + 1 per single tile."""
    prompts, _, _, _ = batch(model)
    assert [image_counts(model, sizes) for sizes, _ in SAMPLES] == [[16 + 2 * 9], [17, 17], [16 + 8 * 9]]
    assert len({len(p) for p in prompts}) == len(prompts)


@pytest.mark.parametrize("policy", [*POLICIES, PAPER_AVL], ids=lambda p: repr(p)[:60])
def test_batch_equals_each_sample_alone(model, policy):
    prompts, pixel_values, sizes, _ = batch(model)
    batched = avl.generate(model, **batch_kwargs(model, policy=policy, max_new_tokens=STEPS, output_logits=True))
    first = 0
    for i, (image_sizes, _) in enumerate(SAMPLES):
        own = slice(first, first + len(image_sizes))
        first += len(image_sizes)
        alone = avl.generate(model, torch.tensor([prompts[i]]), pixel_values=pixel_values[own],
                             image_sizes=sizes[own], batch_num_images=torch.tensor([len(image_sizes)]),
                             policy=policy, max_new_tokens=STEPS, output_logits=True)
        assert batched.tokens[i].tolist() == alone.tokens[0].tolist()
        assert (batched.logits[i] - alone.logits[0]).abs().max() <= 1e-8


@pytest.mark.parametrize("part", [dict(secondary=1.0), dict(prefill_keep=1.0), dict(text_keep=1.0)],
                         ids=["S", "P", "T"])
def test_each_avl_part_at_ratio_one_equals_full_exactly(model, part):
    kwargs = batch_kwargs(model, max_new_tokens=STEPS, output_logits=True)
    full = avl.generate(model, **kwargs)
    ones = avl.generate(model, policy=avl.AVL(**part), **kwargs)
    assert ones.tokens.tolist() == full.tokens.tolist()
    assert torch.equal(ones.logits, full.logits)


def test_avl_with_every_ratio_one_equals_full(model):
    """All parts at 1.0: the same rows attended, but a core step sums them in the core set's order, so the
    logits may differ in the last bits (measured 5e-15 from the first core step on), never more."""
    kwargs = batch_kwargs(model, max_new_tokens=STEPS, output_logits=True)
    full = avl.generate(model, **kwargs)
    ones = avl.generate(model, policy=avl.AVL(secondary=1.0, core=1.0, refresh_every=2, prefill_keep=1.0,
                                              text_keep=1.0), **kwargs)
    assert ones.tokens.tolist() == full.tokens.tolist()
    assert (ones.logits - full.logits).abs().max() <= 1e-12


def test_secondary_ratio_counts_each_samples_own_image_tokens(model):
    """A-VL's secondary set keeps int(0.45 * N_img) image rows per sample and layer of each sample's own
    N_img, newline rows included (34, 17 + 17, 88): 15 + 15 + 39 kept, so 19 + 19 + 49 = 87 fewer rows than
    the full cache in every layer."""
    kwargs = batch_kwargs(model, max_new_tokens=4)
    full = avl.generate(model, **kwargs).stats
    compressed = avl.generate(model, policy=avl.AVL(secondary=0.45, core=0.3, refresh_every=3), **kwargs).stats
    for a, b in zip(full.layers, compressed.layers):
        assert a.stored_rows - b.stored_rows == 87


@pytest.mark.slow
def test_compiled_decode_equals_eager_without_graph_breaks(model):
    """Image-token counts only shape prefill; decode compiles to one graph per variant (ordinary, refresh)."""
    from torch._dynamo.utils import counters

    kwargs = batch_kwargs(model, max_new_tokens=9, policy=PAPER_AVL, output_logits=True)
    eager = avl.generate(model, **kwargs)
    torch._dynamo.reset()
    counters.clear()
    compiled = avl.generate(model, compile=True, **kwargs)
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] in (1, 2)
    assert compiled.tokens.tolist() == eager.tokens.tolist()
    assert (compiled.logits - eager.logits).abs().max() <= 1e-5
