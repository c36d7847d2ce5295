"""VisionZip's selection equals the release's rule applied to transformers' CLIP attentions: one CLIP
tower (LLaVA-1.5), and every anyres tile of LLaVA-NeXT packed as the release's LLaVA-NeXT path packs it."""

from __future__ import annotations

import pytest
import torch

from avl.cache.visionzip import VisionZip, visionzip_select
from avl.models.clip import ClipVisionConfig, ClipVisionTower

SIZE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=96,
            patch_size=12)  # 64 patches


@pytest.fixture(scope="module")
def towers():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    hf = CLIPVisionModel(CLIPVisionConfig(**SIZE)).to(torch.float64).eval()
    with torch.no_grad():  # widen the init so [CLS] attention is far from uniform
        for p in hf.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    hf.set_attn_implementation("eager")
    ours = ClipVisionTower(ClipVisionConfig(**SIZE)).to(torch.float64).eval()
    ours.load_state_dict(hf.state_dict())  # transformers 5 flattens CLIPVisionModel: the same names as avl's
    return hf, ours


def release_visionzip(hidden, attn_weights, metric, dominant_num, contextual_num):
    """The release's CLIPVisionTower_VisionZip.forward body (dvlab-research/VisionZip, clip_encoder.py),
    transcribed: returns (hidden_states_save, all_indices, mask, target_indices)."""
    cls_attention = attn_weights[:, :, 0, 1:]
    cls_attention_sum = cls_attention.sum(dim=1)
    topk_indices = cls_attention_sum.topk(dominant_num, dim=1).indices + 1
    all_indices = torch.cat([torch.zeros((hidden.shape[0], 1), dtype=topk_indices.dtype), topk_indices], dim=1)
    mask = torch.ones_like(hidden[:, :, 0], dtype=torch.bool).scatter_(1, all_indices, False)
    dominant_tokens = hidden.masked_select(~mask.unsqueeze(-1)).view(hidden.shape[0], dominant_num + 1, hidden.shape[2])
    metric_filtered = metric[mask].view(hidden.shape[0], hidden.shape[1] - (dominant_num + 1), metric.shape[2])
    hidden_filtered = hidden.masked_select(mask.unsqueeze(-1)).view(hidden.shape[0], hidden.shape[1] - (dominant_num + 1),
                                                                    hidden.shape[2])
    metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)
    step = max(1, metric_normalized.shape[1] // contextual_num)
    target_indices = torch.arange(0, metric_normalized.shape[1], step)[:contextual_num]
    target_tokens = metric_normalized[:, target_indices, :]
    keep = ~torch.isin(torch.arange(metric_normalized.shape[1]), target_indices)
    tokens_to_merge = metric_normalized[:, keep, :]
    similarity = torch.bmm(tokens_to_merge, target_tokens.transpose(1, 2))
    assign_one_hot = torch.zeros(tokens_to_merge.shape[0], tokens_to_merge.shape[1], contextual_num, dtype=hidden.dtype)
    assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    aggregated_hidden = torch.bmm(assign_one_hot.transpose(1, 2), hidden_filtered[:, keep, :]) / counts
    contextual_tokens = hidden_filtered[:, target_indices, :] + aggregated_hidden
    return torch.cat([dominant_tokens, contextual_tokens], dim=1), all_indices, mask, target_indices


def reference(hf, pixels):
    """transformers' layer -2 hidden states and attentions, and that layer's keys averaged over heads."""
    captured = {}
    layer = hf.encoder.layers[-2].self_attn
    hook = layer.k_proj.register_forward_hook(lambda m, i, o: captured.setdefault("k", o))
    with torch.no_grad():
        out = hf(pixel_values=pixels, output_attentions=True, output_hidden_states=True)
    hook.remove()
    b, t, _ = captured["k"].shape
    metric = captured["k"].view(b, t, hf.config.num_attention_heads, -1).transpose(1, 2).mean(1)
    return out.hidden_states[-2], out.attentions[-2], metric


@pytest.mark.parametrize("dominant,contextual", [(54, 10), (9, 4), (20, 7), (1, 3)])
def test_selection_equals_the_release_on_transformers_attentions(towers, dominant, contextual):
    hf, ours = towers
    pixels = torch.randn(3, 3, 96, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    hidden_ref, attn_ref, metric_ref = reference(hf, pixels)
    expected, all_indices, mask, targets = release_visionzip(hidden_ref, attn_ref, metric_ref, dominant - 1, contextual)

    with torch.no_grad():
        hidden, cls = ours(pixels, layer=-2, cls_attention=True)
    # transformers' eager attention takes the softmax in float32 (avl's tower: float64), hence ~1e-7
    torch.testing.assert_close(hidden, hidden_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(cls.probs, attn_ref[:, :, 0], rtol=0, atol=1e-5)
    got = visionzip_select(hidden, cls, dominant, contextual)

    assert got.dominant.tolist() == all_indices.sort(dim=1).values.tolist()
    rest = [torch.nonzero(m).flatten() for m in mask]
    assert got.contextual.tolist() == [r[targets].tolist() for r in rest]
    assert torch.equal(got.group[:, 0], torch.full((3,), -1))
    torch.testing.assert_close(got.features, expected, rtol=0, atol=1e-5)
    assert got.features.shape == (3, dominant + contextual, SIZE["hidden_size"])


def test_the_tower_is_unchanged_without_cls_attention(towers):
    hf, ours = towers
    pixels = torch.randn(2, 3, 96, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = ours(pixels, layer=-2)
        hidden, _ = ours(pixels, layer=-2, cls_attention=True)
    # the scoring layer takes the explicit softmax (it returns the probabilities), the plain pass SDPA
    torch.testing.assert_close(plain, hidden, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="layer=0 is not supported"):
        ours(pixels, layer=0, cls_attention=True)


@pytest.mark.parametrize("kwargs,match", [
    ({"dominant": 0}, "dominant=0 is out of range; allowed: an integer >= 1"),
    ({"contextual": True}, "contextual=True is out of range"),
    ({"layer": 1.5}, "layer=1.5 is not supported"),
])
def test_bad_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VisionZip(**kwargs)


def test_more_tokens_than_an_image_has_is_named(towers):
    _, ours = towers
    with torch.no_grad():
        hidden, cls = ours(torch.zeros(1, 3, 96, 96, dtype=torch.float64), layer=-2, cls_attention=True)
    with pytest.raises(ValueError, match=r"dominant=60 \+ contextual=10 exceeds the 65 tokens"):
        VisionZip(dominant=60, contextual=10).select(hidden, cls)


NEXT_PINPOINTS = [[24, 48], [48, 24], [48, 48]]
NEXT_SIZES = [(30, 50), (60, 20), (30, 30)]  # (height, width): grids of 1 x 2, 2 x 1 and 2 x 2 tiles


@pytest.fixture(scope="module")
def next_pair(tmp_path_factory):
    """A tiny float64 LLaVA-NeXT saved by transformers (24 px tiles, patch 6: CLS + 16 patches a tile),
    the transformers model with eager attention, and avl's model of the same files."""
    import avl
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=24, patch_size=6, projection_dim=32)
    text = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, tie_word_embeddings=False)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_grid_pinpoints=NEXT_PINPOINTS,
                             image_token_index=300, pad_token_id=301)
    torch.manual_seed(0)
    hf = LlavaNextForConditionalGeneration(config).to(torch.float64).eval()
    with torch.no_grad():  # widen the init so [CLS] attention is far from uniform
        for p in hf.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    directory = tmp_path_factory.mktemp("next_visionzip")
    hf.save_pretrained(directory)
    hf.model.vision_tower.set_attn_implementation("eager")
    return hf, avl.load(directory)


def release_next_image(tile_features, keep_idx, rows, cols, side):
    """The release's LLaVA-NeXT packing of one image (dvlab-research/VisionZip, llava_arch.py:
    `prepare_inputs_labels_for_multimodal_visionzip`'s spatial_unpad branch and
    `restore_image_features_sorted`), transcribed with the tile's patch side for its hard-coded 24."""
    base, image_feature, cur_keep_idx = tile_features[0], tile_features[1:], keep_idx[1:]
    num_img, total_patches, feature_dim = image_feature.shape
    num_keep = cur_keep_idx.shape[1]
    num_extra = total_patches - num_keep
    restore = cur_keep_idx.sort(dim=1).values[:, 1:] - 1
    restored = torch.zeros((num_img, side * side, feature_dim), dtype=image_feature.dtype)
    mask = torch.zeros(num_img, side * side, dtype=torch.bool)
    mask.scatter_(1, restore, True)
    restored[mask] = image_feature[:, 1:num_keep, :].reshape(-1, feature_dim)
    restored = restored.view(rows, cols, side, side, feature_dim).permute(0, 2, 1, 3, 4).contiguous()
    restored = restored.view(rows * side, cols * side, feature_dim)
    mask = mask.view(rows, cols, side, side).permute(0, 2, 1, 3).contiguous().view(rows * side, cols * side)
    selected = torch.cat([restored[mask], image_feature[:, 0], image_feature[:, -num_extra:].reshape(-1, feature_dim)])
    return torch.cat([base, selected])


@pytest.mark.parametrize("dominant,contextual", [(5, 3), (1, 2), (12, 5)])
def test_llava_next_tiles_and_packing_equal_the_release_on_transformers_attentions(next_pair, dominant, contextual):
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    hf, model = next_pair
    pixel_values = torch.randn(len(NEXT_SIZES), 5, 3, 24, 24, dtype=torch.float64,
                               generator=torch.Generator().manual_seed(3))
    zip_policy = VisionZip(dominant=dominant, contextual=contextual)
    with torch.no_grad():
        got = model.visionzip_features(pixel_values, NEXT_SIZES, zip_policy)
        for i, size in enumerate(NEXT_SIZES):
            rows, cols = get_anyres_image_grid_shape(list(size), NEXT_PINPOINTS, 24)
            tiles = pixel_values[i, :1 + rows * cols]
            hidden_ref, attn_ref, metric_ref = reference(hf.model.vision_tower, tiles)
            selected, all_indices, _, _ = release_visionzip(hidden_ref, attn_ref, metric_ref, dominant - 1, contextual)
            expected = release_next_image(hf.model.multi_modal_projector(selected), all_indices, rows, cols, side=4)

            hidden, cls = model.vision_tower(tiles, layer=-2, cls_attention=True)
            ours = zip_policy.select(hidden, cls)
            assert ours.dominant.tolist() == all_indices.sort(dim=1).values.tolist()  # every crop: base and grid
            assert got[i].shape == (len(tiles) * (dominant + contextual), 64)
            # transformers' eager attention takes the softmax in float32 (avl's tower: float64), hence ~1e-7
            torch.testing.assert_close(got[i], expected, rtol=0, atol=1e-5)
