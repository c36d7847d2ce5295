"""VisionZip as LLaVA-1.5's feature policy: the prompt is compacted to dominant + contextual image rows
per image in prefill; checked against transformers' LLaVA fed those tokens by hand."""

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


def test_llava_next_refuses_visionzip_before_prefill(tmp_path):
    from avl.inputs import check_policy
    from tiny_llava import build_tiny_next_checkpoint

    model = avl.load(build_tiny_next_checkpoint(tmp_path / "next"))
    with pytest.raises(ValueError, match="selects the image features of the token sequence.*LLaVA-1.5"):
        check_policy(model, avl.Full(), ZIP)
