"""Qwen2-VL / Qwen2.5-VL language side against transformers on tiny checkpoints it wrote: M-RoPE
positions (`rope_index` vs `get_rope_index`), the M-RoPE tables, dense prompt logits, the decode
positions (`rope_deltas`) through transformers' own cached generation, loading of both checkpoint
layouts and tied embeddings, and config errors.

Tolerances (float64): with `set_reference_casts()` (transformers' float32 RMSNorm statistics and
vision rotary) logits agree to ~1e-13 (1e-10 asserted); the plain float64 path differs by those
islands, ~1e-6 on logits of magnitude ~10 (5e-5 asserted). A wrong position, section or mask moves
logits by O(1)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import avl
from avl.models.qwen2_vl import Qwen2VLConfig, mrope_cos_sin, rope_index
from tiny_qwen2_vl import IMAGE_ID, VIDEO_ID, build_hf, image_prompt, left_pad, random_pixels, text_config

FAMILIES = ("qwen2_vl", "qwen2_5_vl")


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    hf = build_hf(directory, request.param)
    return directory, hf, avl.load(directory)


def batch(grids_per_sample: list[list[list[int]]], seed: int = 0):
    """Left-padded prompts (text before, images, text after) of different lengths and their inputs."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i, grids in enumerate(grids_per_sample):
        before = torch.randint(3, 390, (2 + 3 * i,), generator=g).tolist()
        after = torch.randint(3, 390, (4 + i,), generator=g).tolist()
        rows.append(image_prompt(before, grids, after))
    ids, mask = left_pad(rows)
    grid = torch.tensor([g_ for grids in grids_per_sample for g_ in grids]) if any(grids_per_sample) else None
    pixels = random_pixels(grid, seed) if grid is not None else None
    return ids, mask, pixels, grid


CASES = {
    "one_image": [[[1, 8, 12]]],
    "padded_pair": [[[1, 4, 10]], [[1, 12, 6]]],
    "two_images_and_text_only": [[[1, 6, 4], [1, 2, 8]], [], [[1, 4, 4]]],
}


@pytest.mark.parametrize("name", CASES)
def test_rope_index_matches_transformers(checkpoint, name):
    _, hf, model = checkpoint
    ids, mask, _, grid = batch(CASES[name])
    ref_positions, ref_deltas = hf.model.get_rope_index(ids, (ids == IMAGE_ID).int(), image_grid_thw=grid,
                                                        attention_mask=mask)
    positions, deltas = model.rope_index(ids, grid, mask)
    assert torch.equal(positions, ref_positions)
    assert deltas.tolist() == ref_deltas.flatten().tolist()
    assert positions.shape == (3, *ids.shape) and deltas.shape == (ids.shape[0],)


def test_rope_index_rejects_runs_that_do_not_fit_the_grid():
    ids = torch.tensor([[5, IMAGE_ID, IMAGE_ID, IMAGE_ID, 6]])
    with pytest.raises(ValueError, match="run of 3 image tokens"):
        rope_index(ids, torch.tensor([[1, 4, 4]]), None, image_token_id=IMAGE_ID, spatial_merge_size=2)
    with pytest.raises(ValueError, match="more image-token runs"):
        rope_index(ids, None, None, image_token_id=IMAGE_ID, spatial_merge_size=2)
    with pytest.raises(ValueError, match="2 rows"):
        rope_index(ids[:, :1], torch.tensor([[1, 2, 2], [1, 2, 2]]), None, image_token_id=IMAGE_ID,
                   spatial_merge_size=2)


@pytest.mark.parametrize("section", [[2, 3, 3], [4, 2, 2], [1, 1, 6]])
def test_mrope_tables_match_transformers(section):
    from transformers import Qwen2VLTextConfig as HFTextConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding

    rope = {"rope_type": "default", "mrope_section": section, "rope_theta": 5000.0}
    hf_rotary = Qwen2VLRotaryEmbedding(HFTextConfig(**text_config(rope_parameters=rope)))
    positions = torch.randint(0, 500, (3, 2, 7), generator=torch.Generator().manual_seed(sum(section)))
    x = torch.zeros(1, dtype=torch.float64)
    ref_cos, ref_sin = hf_rotary(x, positions)
    cos, sin = mrope_cos_sin(positions, 16, 5000.0, tuple(section), torch.float64)
    assert torch.equal(cos[:, 0], ref_cos) and torch.equal(sin[:, 0], ref_sin)


def hf_logits(hf, ids, mask, pixels, grid):
    return hf(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid,
              mm_token_type_ids=(ids == IMAGE_ID).int()).logits


@pytest.mark.parametrize("name", CASES)
@torch.inference_mode()
def test_dense_logits_match_transformers(checkpoint, name):
    _, hf, model = checkpoint
    ids, mask, pixels, grid = batch(CASES[name], seed=1)
    ref = hf_logits(hf, ids, mask, pixels, grid)
    valid = mask.bool()
    try:
        exact = model.set_reference_casts()(ids, mask, pixels, grid)
    finally:
        model.set_reference_casts(False)
    plain = model(ids, mask, pixels, grid)
    assert plain.dtype == torch.float64 and plain.shape == ref.shape
    assert (exact - ref)[valid].abs().max() <= 1e-10, name
    assert (plain - ref)[valid].abs().max() <= 5e-5, name
    assert ref[valid].abs().max() > 1.0


@torch.inference_mode()
def test_decode_positions_follow_rope_deltas(checkpoint):
    """transformers' cached generation places step n at (valid tokens so far) + rope_delta on all three
    axes; the dense forward over prompt + generated tokens must give the same logits at every step."""
    _, hf, model = checkpoint
    ids, mask, pixels, grid = batch(CASES["padded_pair"], seed=2)
    steps = 4
    out = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid,
                      mm_token_type_ids=(ids == IMAGE_ID).int(), max_new_tokens=steps, min_new_tokens=steps,
                      do_sample=False, output_logits=True, return_dict_in_generate=True)
    ref = torch.stack(out.logits, dim=1)  # [B, steps, V], float32: generate casts its logits
    full = out.sequences
    full_mask = torch.cat([mask, torch.ones(mask.shape[0], steps, dtype=mask.dtype)], dim=1)
    model.set_reference_casts()
    try:
        logits = model(full, full_mask, pixels, grid)[:, ids.shape[1] - 1: -1]
    finally:
        model.set_reference_casts(False)
    assert (logits.to(ref.dtype) - ref).abs().max() <= 1e-6  # float32 rounding of logits ~5
    assert torch.equal(logits.argmax(-1), full[:, ids.shape[1]:])
    positions, deltas = model.rope_index(full, grid, full_mask)
    generated = positions[:, :, ids.shape[1]:]  # [3, B, steps]
    n = mask.sum(-1)[:, None] + torch.arange(steps)  # valid tokens before each step
    assert torch.equal(generated, (n + deltas[:, None]).expand(3, -1, -1))


@torch.inference_mode()
def test_transformers_4_layout_loads_the_same_model(checkpoint, tmp_path):
    """transformers 4.52-4.57 saved `model.language_model.*` / `model.visual.*`; the hub and transformers 5
    use `model.*` / `visual.*`."""
    directory, _, model = checkpoint
    state = load_file(directory / "model.safetensors")
    renamed = {("model.language_model." + k[len("model."):] if k.startswith("model.") else
                "model." + k if k.startswith("visual.") else k): v for k, v in state.items()}
    assert any(k.startswith("model.visual.") for k in renamed)
    save_file(renamed, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_bytes((directory / "config.json").read_bytes())
    other = avl.load(tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), name


@torch.inference_mode()
def test_tied_embeddings_load_and_match(tmp_path):
    hf = build_hf(tmp_path, "qwen2_vl", seed=3, tie=True)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    model = avl.load(tmp_path).set_reference_casts()
    assert model.language_model.lm_head.weight is model.language_model.embed_tokens.weight
    ids, mask, pixels, grid = batch(CASES["padded_pair"], seed=3)
    assert (model(ids, mask, pixels, grid) - hf_logits(hf, ids, mask, pixels, grid))[mask.bool()].abs().max() <= 1e-10


def test_older_hub_config_with_flat_text_fields():
    """Qwen/Qwen2-VL-7B-Instruct's config.json keeps the text fields at the top level, `rope_scaling`
    {"type": "mrope"} and the original `in_chans`."""
    raw = {"model_type": "qwen2_vl", "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
           "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
           "vocab_size": 152064, "tie_word_embeddings": False, "image_token_id": 151655,
           "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
           "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                             "hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2,
                             "spatial_patch_size": 14, "temporal_patch_size": 2}}
    cfg = Qwen2VLConfig.from_dict(raw)
    assert cfg.text.mrope_section == (16, 24, 24) and cfg.text.head_dim == 128 and cfg.text.rope_theta == 1e6
    assert cfg.text.qkv_bias and not cfg.text.attention_bias and cfg.vision.in_channels == 3


@pytest.mark.parametrize("change,match", [
    ({"text_config": {"rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 4]}}}, "mrope_section"),
    ({"text_config": {"use_sliding_window": True}}, "use_sliding_window"),
    ({"text_config": {"rope_parameters": {"rope_type": "yarn"}}}, "rope_type"),
    ({"vision_config": {"hidden_size": 32, "out_hidden_size": 32}}, "output width"),
    ({"model_type": "qwen3_vl"}, "model_type"),
])
def test_bad_configs_are_named(checkpoint, change, match):
    directory, _, _ = checkpoint
    raw = json.loads((directory / "config.json").read_text())
    for key, value in change.items():
        raw[key] = raw[key] | value if isinstance(value, dict) else value
    with pytest.raises(ValueError, match=match):
        Qwen2VLConfig.from_dict(raw)


def test_image_token_count_must_match_the_grid(checkpoint):
    _, _, model = checkpoint
    ids, mask, pixels, grid = batch(CASES["one_image"])
    with pytest.raises(ValueError, match="image tokens"):
        model(ids[:, 1:], mask[:, 1:], pixels, grid[:, :] * torch.tensor([1, 2, 1]))
    with pytest.raises(ValueError, match="video tokens"):
        model(ids.masked_fill(ids == IMAGE_ID, VIDEO_ID), mask)


@torch.inference_mode()
def test_processor_outputs_feed_the_model_as_transformers(checkpoint, tmp_path):
    """End to end: `Qwen2VLProcessor` on real-size images and chat prompts -> the model, taking every
    processor output under its name, against transformers' model on the same inputs."""
    from PIL import Image

    from avl.processing.qwen2_vl import Qwen2VLProcessor
    from tiny_qwen2_vl import CHAT_TEMPLATE, build_qwen2_tokenizer

    _, hf, model = checkpoint
    build_qwen2_tokenizer(tmp_path)
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 3136, "max_pixels": 100_000}))
    processor = Qwen2VLProcessor.from_dir(tmp_path)
    g = torch.Generator().manual_seed(0)
    images = [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())
              for h, w in ((120, 200), (300, 90))]
    prompts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                            {"type": "text", "text": text}]}])
               for text in ("Describe this image.", "How many dogs?")]
    inputs = processor(prompts, images)
    ref = hf(**{k: v.to(torch.float64) if v.is_floating_point() else v for k, v in inputs.items()}).logits
    logits = model.set_reference_casts()(**inputs)
    model.set_reference_casts(False)
    assert (logits - ref)[inputs["attention_mask"].bool()].abs().max() <= 1e-10
    with pytest.raises(ValueError, match="mm_token_type_ids"):
        model(**(inputs | {"mm_token_type_ids": torch.zeros_like(inputs["input_ids"])}))
