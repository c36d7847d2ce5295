"""Every cache policy on LLaVA-NeXT, whose samples have different image-token counts.

A batch mixes prompt lengths, image sizes (so 52, 40 + 52 and 88 image tokens) and a prompt with
two images; each sample must generate exactly what it generates alone.
"""

from __future__ import annotations

import pytest
import torch

import avl
from avl.models.llava_next import LlavaNext, LlavaNextConfig
from tiny_llava import IMAGE_TOKEN, POLICIES, left_pad, prompt_ids

STEPS = 12
RAW_CONFIG = {
    "model_type": "llava_next", "image_token_index": IMAGE_TOKEN,
    "image_grid_pinpoints": [[24, 48], [48, 24], [48, 48]],
    "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                      "image_size": 24, "patch_size": 6},
    "text_config": {"model_type": "llama", "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128,
                    "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2},
}
# per sample: its images' (height, width), text tokens before the first image / between / after
SAMPLES = [
    ([(30, 50)], (2, 0, 4)),
    ([(60, 20), (20, 40)], (7, 3, 9)),
    ([(30, 30)], (4, 0, 2)),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: intra-op threads only add overhead, and on a shared 2-core machine they stall."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> LlavaNext:
    """A tiny random float64 LLaVA-NeXT (GQA: 2 KV heads for 4 query heads)."""
    torch.manual_seed(0)
    net = LlavaNext(LlavaNextConfig.from_dict(RAW_CONFIG)).to(torch.float64).eval()
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
        net.image_newline.normal_(0, 1.0)
    return net


def sample_prompt(model: LlavaNext, sizes: list[tuple[int, int]], lengths: tuple[int, int, int],
                  seed: int) -> list[int]:
    before, between, after = lengths
    ids = prompt_ids(before, after, model.num_image_tokens(sizes[0]), seed)
    if len(sizes) == 2:  # insert the second image after `between` text tokens following the first
        cut = ids.index(IMAGE_TOKEN) + model.num_image_tokens(sizes[0]) + between
        ids = ids[:cut] + [IMAGE_TOKEN] * model.num_image_tokens(sizes[1]) + ids[cut:]
    return ids


def batch(model: LlavaNext):
    prompts = [sample_prompt(model, sizes, lengths, seed) for seed, (sizes, lengths) in enumerate(SAMPLES)]
    sizes = torch.tensor([size for image_sizes, _ in SAMPLES for size in image_sizes])
    generator = torch.Generator().manual_seed(9)
    pixel_values = torch.randn(len(sizes), 5, 3, 24, 24, dtype=torch.float64, generator=generator)
    return prompts, pixel_values, sizes


def test_samples_have_different_image_token_counts(model):
    prompts, _, sizes = batch(model)
    assert [model.num_image_tokens(s) for s in sizes.tolist()] == [52, 40, 52, 88]
    assert len({len(p) for p in prompts}) == len(prompts)


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: repr(p)[:60])
def test_batch_equals_each_sample_alone(model, policy):
    prompts, pixel_values, sizes = batch(model)
    ids, mask = left_pad(prompts)
    batched = avl.generate(model, ids, pixel_values=pixel_values, image_sizes=sizes, attention_mask=mask,
                           policy=policy, max_new_tokens=STEPS, output_logits=True)
    first = 0
    for i, (image_sizes, _) in enumerate(SAMPLES):
        own = slice(first, first + len(image_sizes))
        first += len(image_sizes)
        alone = avl.generate(model, torch.tensor([prompts[i]]), pixel_values=pixel_values[own], image_sizes=sizes[own],
                             policy=policy, max_new_tokens=STEPS, output_logits=True)
        assert batched.tokens[i].tolist() == alone.tokens[0].tolist()
        assert (batched.logits[i] - alone.logits[0]).abs().max() <= 1e-8


def test_avl_with_every_ratio_one_equals_full(model):
    prompts, pixel_values, sizes = batch(model)
    ids, mask = left_pad(prompts)
    kwargs = dict(pixel_values=pixel_values, image_sizes=sizes, attention_mask=mask, max_new_tokens=STEPS,
                  output_logits=True)
    full = avl.generate(model, ids, **kwargs)
    ones = avl.generate(model, ids, policy=avl.AVL(secondary=1.0, core=1.0, refresh_every=2, prefill_keep=1.0,
                                                   text_keep=1.0), **kwargs)
    assert ones.tokens.tolist() == full.tokens.tolist()
    assert (ones.logits - full.logits).abs().max() <= 1e-10


def test_secondary_ratio_counts_each_samples_own_image_tokens(model):
    """A-VL's secondary set keeps int(0.5 * N_img) image rows per sample and layer, of each sample's own
    N_img (52, 40 + 52, 88): 26 + 46 + 44 rows kept, so 116 fewer rows than the full cache, per layer."""
    prompts, pixel_values, sizes = batch(model)
    ids, mask = left_pad(prompts)
    kwargs = dict(pixel_values=pixel_values, image_sizes=sizes, attention_mask=mask, max_new_tokens=4)
    full = avl.generate(model, ids, **kwargs).stats
    compressed = avl.generate(model, ids, policy=avl.AVL(secondary=0.5, core=0.25, refresh_every=2), **kwargs).stats
    for a, b in zip(full.layers, compressed.layers):
        assert a.stored_rows - b.stored_rows == 116


@pytest.mark.slow
def test_compiled_decode_equals_eager_without_graph_breaks(model):
    """Image-token counts only shape prefill; decode compiles to one graph per variant as for LLaVA-1.5."""
    from torch._dynamo.utils import counters

    prompts, pixel_values, sizes = batch(model)
    ids, mask = left_pad(prompts)
    kwargs = dict(pixel_values=pixel_values, image_sizes=sizes, attention_mask=mask, max_new_tokens=9,
                  policy=avl.AVL(0.5, 0.25, 3, 0.75, 0.5), output_logits=True)
    eager = avl.generate(model, ids, **kwargs)
    torch._dynamo.reset()
    counters.clear()
    compiled = avl.generate(model, ids, compile=True, **kwargs)
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 2  # ordinary and refresh steps
    assert compiled.tokens.tolist() == eager.tokens.tolist()
    assert (compiled.logits - eager.logits).abs().max() <= 1e-5
