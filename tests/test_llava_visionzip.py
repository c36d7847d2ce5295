"""VisionZip as LLaVA-1.5's and LLaVA-NeXT's feature policy: the prompt is compacted to dominant +
contextual image rows per image (per anyres tile on LLaVA-NeXT) in prefill; checked against
transformers' LLaVA / LLaVA-NeXT fed those tokens by hand. LLaVA-OneVision (SigLIP) refuses it."""

from __future__ import annotations

import pytest
import torch

import avl
from avl.cache.visionzip import visionzip_select
from avl.models.clip import ClsAttention
from tiny_llava import IMAGE_TOKEN, left_pad, prompt_ids

ZIP = avl.VisionZip(dominant=5, contextual=3)  # of the tiny tower's 17 tokens (CLS + 16 patches)


@pytest.fixture(scope="module")
def models(hf_llava):
    return hf_llava[1], avl.load(hf_llava[0])


def pixels(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 48, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def transformers_visionzip_embeds(hf, ids: list[int], image: torch.Tensor) -> torch.Tensor:
    """The prompt with its 16 image tokens replaced by VisionZip's 8, embedded by transformers' own
    tower (eager attention, layer -2's [CLS] row and keys), projector and embedding table."""
    tower = hf.model.vision_tower
    tower.config._attn_implementation = "eager"
    out = tower(image, output_hidden_states=True, output_attentions=True)
    layer = tower.encoder.layers[-2]
    normed = layer.layer_norm1(out.hidden_states[-3])
    heads = tower.config.num_attention_heads
    keys = layer.self_attn.k_proj(normed).unflatten(-1, (heads, -1)).transpose(1, 2)
    attention = ClsAttention(out.attentions[-2][:, :, 0], keys)
    features = hf.model.multi_modal_projector(visionzip_select(out.hidden_states[-2], attention, 5, 3).features)
    start = ids.index(IMAGE_TOKEN)
    compact = ids[:start] + [IMAGE_TOKEN] * 8 + ids[start + 16:]
    compact_ids = torch.tensor([compact])
    embeds = hf.model.get_input_embeddings()(compact_ids.masked_fill(compact_ids == IMAGE_TOKEN, 0))
    embeds[0, start:start + 8] = features[0]
    return embeds


@torch.no_grad()
def test_visionzip_equals_transformers_fed_the_selected_tokens(models):
    hf, model = models
    ids, image = prompt_ids(3, 6, 16, 5), pixels(1, 5)
    embeds = transformers_visionzip_embeds(hf, ids, image)
    expected = hf.generate(inputs_embeds=embeds, max_new_tokens=8, do_sample=False, output_logits=True,
                           return_dict_in_generate=True, pad_token_id=301, eos_token_id=None)
    out = avl.generate(model, torch.tensor([ids]), pixel_values=image, feature_policy=ZIP, max_new_tokens=8,
                       output_logits=True)
    assert out.tokens[0].tolist() == expected.sequences[0].tolist()
    # transformers takes RMSNorm in float32 even in a float64 model: ~1e-6 (a wrong token or row: > 1e-2)
    assert (out.logits[0] - torch.stack(expected.logits, 1)[0]).abs().max() <= 1e-4
    assert out.stats.layers[0].full_rows == len(ids) - 16 + 8 + 7  # the compacted prompt plus 7 decode steps


def test_batched_visionzip_equals_each_prompt_alone(models):
    _, model = models
    prompts = [prompt_ids(2, 4, 16, 0), prompt_ids(7, 9, 16, 1)]
    images = pixels(2, 7)
    ids, mask = left_pad(prompts)
    for policy in (avl.Full(), avl.SnapKV(0.5, window_size=4, kernel_size=3)):
        batched = avl.generate(model, ids, pixel_values=images, attention_mask=mask, policy=policy, feature_policy=ZIP,
                               max_new_tokens=6, output_logits=True)
        for i, prompt in enumerate(prompts):
            alone = avl.generate(model, torch.tensor([prompt]), pixel_values=images[i:i + 1], policy=policy,
                                 feature_policy=ZIP, max_new_tokens=6, output_logits=True)
            assert batched.tokens[i].tolist() == alone.tokens[0].tolist()
            assert (batched.logits[i] - alone.logits[0]).abs().max() <= 1e-8


def test_visionzip_is_refused_where_it_does_not_apply(models):
    _, model = models
    ids = torch.tensor([prompt_ids(2, 4, 16, 0)])
    with pytest.raises(ValueError, match=r"keeps 18 tokens of an image, which has 17 \(CLS \+ patches\)"):
        avl.generate(model, ids, pixel_values=pixels(1, 0), feature_policy=avl.VisionZip(dominant=10, contextual=8))
    with pytest.raises(ValueError, match="selects the image features of the token sequence.*LLaVA-1.5"):
        model.language_model.check_policy(avl.Full(), ZIP)  # e.g. Qwen-VL: its decoder gets it


def test_llava_onevision_refuses_visionzip_naming_why(tmp_path):
    from avl.inputs import check_policy
    from tiny_llava import build_tiny_onevision_checkpoint

    model = avl.load(build_tiny_onevision_checkpoint(tmp_path / "onevision"))
    with pytest.raises(ValueError, match=r"cannot run on LLaVA-OneVision: .*\[CLS\] token, and SigLIP has none"):
        check_policy(model, avl.Full(), ZIP)


NEXT_ZIP = avl.VisionZip(dominant=5, contextual=3)  # of each 24 px tile's 17 tokens (CLS + 16 patches)
# per sample: its images' (height, width) (grids of 2 x 2, 2 x 1, 1 x 2, 2 x 2 tiles), text before / between / after
NEXT_SAMPLES = [([(30, 50)], (2, 0, 4)), ([(60, 20), (20, 40)], (7, 3, 9)), ([(30, 30)], (4, 0, 2))]


@pytest.fixture(scope="module")
def next_models(tmp_path_factory):
    """A tiny float64 LLaVA-NeXT saved by transformers (24 px tiles, patch 6), and avl's model of it."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=24, patch_size=6, projection_dim=32)
    text = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN, pad_token_id=301,
                             image_grid_pinpoints=[[24, 48], [48, 24], [48, 48]])
    torch.manual_seed(0)
    hf = LlavaNextForConditionalGeneration(config).to(torch.float64).eval()
    with torch.no_grad():  # widen the init: [CLS] attention far from uniform, logits far apart
        for p in hf.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    directory = tmp_path_factory.mktemp("next_visionzip")
    hf.save_pretrained(directory)
    return hf, avl.load(directory)


def next_batch(model):
    """Prompts (each image expanded to its full anyres count), pixel_values [4, 5, 3, 24, 24], image_sizes [4, 2]."""
    prompts = []
    for seed, (sizes, (before, between, after)) in enumerate(NEXT_SAMPLES):
        ids = prompt_ids(before, after, model.num_image_tokens(sizes[0]), seed)
        if len(sizes) == 2:
            cut = ids.index(IMAGE_TOKEN) + model.num_image_tokens(sizes[0]) + between
            ids = ids[:cut] + [IMAGE_TOKEN] * model.num_image_tokens(sizes[1]) + ids[cut:]
        prompts.append(ids)
    sizes = torch.tensor([size for image_sizes, _ in NEXT_SAMPLES for size in image_sizes])
    return prompts, pixels_next(len(sizes), 9), sizes


def pixels_next(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 5, 3, 24, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_llava_next_visionzip_equals_transformers_fed_the_selected_tokens(next_models):
    hf, model = next_models
    size = (20, 40)  # 1 base + 1 x 2 grid tiles: 3 * (5 + 3) = 24 image tokens instead of 16 + 4 * 9 = 52
    ids, image = prompt_ids(3, 6, model.num_image_tokens(size), 5), pixels_next(1, 5)
    features = model.visionzip_features(image, [size], NEXT_ZIP)[0]  # = the release's (tests/cache/test_visionzip.py)
    start, n_full = ids.index(IMAGE_TOKEN), model.num_image_tokens(size)
    compact = torch.tensor([ids[:start] + [IMAGE_TOKEN] * len(features) + ids[start + n_full:]])
    embeds = hf.model.get_input_embeddings()(compact.masked_fill(compact == IMAGE_TOKEN, 0))
    embeds[0, start:start + len(features)] = features
    expected = hf.generate(inputs_embeds=embeds, max_new_tokens=8, do_sample=False, output_logits=True,
                           return_dict_in_generate=True, pad_token_id=301, eos_token_id=None)
    out = avl.generate(model, torch.tensor([ids]), pixel_values=image, image_sizes=torch.tensor([size]),
                       feature_policy=NEXT_ZIP, max_new_tokens=8, output_logits=True)
    assert len(features) == 24 and n_full == 52
    assert out.tokens[0].tolist() == expected.sequences[0].tolist()
    # transformers takes RMSNorm in float32 even in a float64 model: ~1e-6 (a wrong token or row: > 1e-2)
    assert (out.logits[0] - torch.stack(expected.logits, 1)[0]).abs().max() <= 1e-4
    assert out.stats.layers[0].full_rows == len(ids) - n_full + 24 + 7  # the compacted prompt plus 7 decode steps


@pytest.mark.parametrize("policy", [avl.Full(), avl.SnapKV(0.5, window_size=4, kernel_size=3), avl.VLCache(0.4)],
                         ids=repr)
def test_llava_next_batched_visionzip_equals_each_prompt_alone(next_models, policy):
    _, model = next_models
    prompts, images, sizes = next_batch(model)
    ids, mask = left_pad(prompts)
    batched = avl.generate(model, ids, pixel_values=images, image_sizes=sizes, attention_mask=mask, policy=policy,
                           feature_policy=NEXT_ZIP, max_new_tokens=6, output_logits=True)
    first = 0
    for i, (image_sizes, _) in enumerate(NEXT_SAMPLES):
        own = slice(first, first + len(image_sizes))
        first += len(image_sizes)
        alone = avl.generate(model, torch.tensor([prompts[i]]), pixel_values=images[own], image_sizes=sizes[own],
                             policy=policy, feature_policy=NEXT_ZIP, max_new_tokens=6, output_logits=True)
        assert batched.tokens[i].tolist() == alone.tokens[0].tolist()
        assert (batched.logits[i] - alone.logits[0]).abs().max() <= 1e-8


def test_llava_next_visionzip_counts_and_errors(next_models):
    _, model = next_models
    prompts, images, sizes = next_batch(model)
    ids, mask = left_pad(prompts)
    compact, compact_mask = model.visionzip_prompt(ids, mask, images, sizes, NEXT_ZIP)
    assert [model.num_image_tokens(s) for s in sizes.tolist()] == [52, 40, 52, 88]
    assert [model.visionzip_tokens(s, NEXT_ZIP) for s in sizes.tolist()] == [40, 24, 24, 40]  # 5, 3, 3, 5 tiles x 8
    assert (compact == IMAGE_TOKEN).sum(-1).tolist() == [40, 48, 40]
    assert compact_mask.sum(-1).tolist() == [len(p) - n + k for p, n, k in zip(prompts, [52, 92, 88], [40, 48, 40])]
    with pytest.raises(ValueError, match=r"keeps 18 tokens of an image, which has 17 \(CLS \+ patches\)"):
        avl.generate(model, ids, pixel_values=images, image_sizes=sizes, attention_mask=mask,
                     feature_policy=avl.VisionZip(dominant=10, contextual=8))
