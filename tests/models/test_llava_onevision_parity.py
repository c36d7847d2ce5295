"""LLaVA-OneVision against transformers' LlavaOnevisionForConditionalGeneration on the same checkpoint files.

Tiny random checkpoints saved by transformers itself: SigLIP 26 px tiles / patch 6 (the convolution
reads 4 x 4 patches and drops 2 pixels, as so400m/14 does at 384 px), grid resolutions of 1..4 x 1..4
tiles, anyres_max_9 (so a 4 x 4 grid, 16 x 16 features, is downsampled). Two Qwen2 text models:
"untied" (MHA) and "tied" (2 KV heads for 4 query heads, tied LM head as Qwen2-0.5B, rope_theta 1e6).
"""

from __future__ import annotations

import json
from unittest import mock

import pytest
import torch

import avl
from avl.models.llava_onevision import LlavaOnevision, LlavaOnevisionConfig
from avl.weights import CheckpointError, save_sharded
from tiny_llava import IMAGE_TOKEN, PAD_TOKEN, left_pad, prompt_ids

TILE = 26
PINPOINTS = [[TILE * r, TILE * c] for r in range(1, 5) for c in range(1, 5)]
MAX_TILES = 17  # 1 base + a 4 x 4 grid
# float64 against float64 (measured: features 4e-15, logits 1e-14, 16 greedy steps 8e-15); far inside the bounds
TOL64 = 1e-10
STEPS = 16  # greedy steps of the generation tests
# (height, width): square small / large (4 x 4 grid, downsampled), wide, tall, very wide, very tall
SIZES = [(30, 30), (100, 100), (40, 110), (120, 35), (80, 300), (300, 20)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: intra-op threads only add overhead, and on a shared 2-core machine they stall."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_hf_config(variant: str, vocab_size: int = 320, image_token: int = IMAGE_TOKEN, pad_token: int = PAD_TOKEN):
    from transformers import LlavaOnevisionConfig as HFConfig
    from transformers import Qwen2Config, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                image_size=TILE, patch_size=6, vision_use_head=False)
    tied = variant == "tied"
    text = Qwen2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2 if tied else 4, max_position_embeddings=1024,
                       rope_parameters={"rope_type": "default", "rope_theta": 1e6 if tied else 10000.0},
                       tie_word_embeddings=tied)
    return HFConfig(vision_config=vision, text_config=text, image_grid_pinpoints=PINPOINTS,
                    image_token_index=image_token, video_token_index=302, pad_token_id=pad_token,
                    tie_word_embeddings=tied)


def save_hf_onevision(directory, variant: str, seed: int = 0, **config):
    """Random-init a transformers LlavaOnevisionForConditionalGeneration in float64, save it, return it (eval)."""
    from transformers import LlavaOnevisionForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(tiny_hf_config(variant, **config)).to(torch.float64).eval()
    with torch.no_grad():  # widen transformers' tiny init so that features and logits differ clearly
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
            else:
                p.add_(torch.randn_like(p) * 0.1)
        model.model.image_newline.normal_(0, 1.0)
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="module", params=["untied", "tied"])
def pair(request, tmp_path_factory):
    """(variant, checkpoint dir, transformers model, our model) per text-model style."""
    directory = tmp_path_factory.mktemp(f"hf_onevision_{request.param}")
    hf = save_hf_onevision(directory, request.param)
    return request.param, directory, hf, avl.load(directory)


def pixels(n: int, seed: int, tiles: int = MAX_TILES) -> torch.Tensor:
    return torch.randn(n, tiles, 3, TILE, TILE, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _rms_norm_in_input_dtype(self, hidden_states):
    """transformers' Qwen2RMSNorm.forward without its cast to float32 (the statistics in the input's dtype)."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def hf_logits(hf, ids, mask, pixel_values=None, image_sizes=None, batch_num_images=None, float64_norms=True):
    """transformers' logits with generation's positions (cumsum of the mask), as avl counts them.

    transformers' Qwen2RMSNorm takes its statistics in float32 even for a float64 model, which alone
    moves float64 logits by ~1e-6; `float64_norms` removes that one cast (avl keeps float64 in
    float64), so that the float64 comparison checks everything else to float64 precision.
    """
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    norm = _rms_norm_in_input_dtype if float64_norms else Qwen2RMSNorm.forward
    with torch.no_grad(), mock.patch.object(Qwen2RMSNorm, "forward", norm):
        return hf(input_ids=ids, attention_mask=mask, position_ids=positions, pixel_values=pixel_values,
                  image_sizes=image_sizes, batch_num_images=batch_num_images).logits


def test_load_builds_onevision_with_the_config(pair):
    variant, _, _, model = pair
    cfg = model.config
    assert isinstance(model, LlavaOnevision) and isinstance(cfg, LlavaOnevisionConfig)
    assert cfg.image_grid_pinpoints == tuple(map(tuple, PINPOINTS)) and cfg.max_tiles == 9
    assert cfg.text.qkv_bias and not cfg.text.attention_bias
    assert cfg.text.tie_word_embeddings == (variant == "tied")
    assert (cfg.text.num_key_value_heads, cfg.text.rope_theta) == ((2, 1e6) if variant == "tied" else (4, 10000.0))
    if variant == "tied":
        assert model.language_model.lm_head.weight is model.language_model.embed_tokens.weight
    assert model.dtype == torch.float64


def test_image_features_equal_transformers(pair):
    """The packed features (tiles -> SigLIP -> projector -> base + unpadded, downsampled grid + newlines)."""
    _, _, hf, model = pair
    sizes = torch.tensor(SIZES)
    pixel_values = pixels(len(SIZES), 3)
    with torch.no_grad():
        ref = hf.model.get_image_features(pixel_values, sizes).pooler_output
        ours = model.packed_image_features(pixel_values, SIZES)
    assert [f.shape[0] for f in ours] == [f.shape[0] for f in ref] == [model.num_image_tokens(s) for s in SIZES]
    assert model.num_image_tokens((100, 100)) == 16 + 12 * 13  # 16 x 16 map downsampled to 12 x 12
    for a, b in zip(ours, ref):
        assert (a - b).abs().max() <= TOL64


def test_multi_image_prompt_features_equal_transformers(pair):
    """batch_num_images [2, 1]: the first prompt's two images are one tile each (base + newline)."""
    _, _, hf, model = pair
    sizes = [(40, 110), (30, 30), (100, 100)]
    pixel_values = pixels(3, 4)
    with torch.no_grad():
        ref = hf.model.get_image_features(pixel_values, torch.tensor(sizes),
                                          batch_num_images=torch.tensor([2, 1])).pooler_output
        ours = model.packed_image_features(pixel_values, sizes, torch.tensor([2, 1]))
    assert [f.shape[0] for f in ours] == [f.shape[0] for f in ref] == [17, 17, 16 + 12 * 13]
    for a, b in zip(ours, ref):
        assert (a - b).abs().max() <= TOL64


@pytest.mark.parametrize("size", SIZES, ids=["small", "large", "wide", "tall", "very-wide", "very-tall"])
def test_float64_logits_equal_transformers(pair, size):
    _, _, hf, model = pair
    ids = torch.tensor([prompt_ids(3, 7, model.num_image_tokens(size), seed=sum(size))])
    mask = torch.ones_like(ids)
    pixel_values, image_sizes = pixels(1, sum(size)), torch.tensor([size])
    ref = hf_logits(hf, ids, mask, pixel_values, image_sizes)
    with torch.no_grad():
        out = model(ids, mask, pixel_values, image_sizes)
    assert out.dtype == torch.float64 and out.shape == ref.shape
    assert (out - ref).abs().max() <= TOL64
    assert ref.std() > 0.5  # logits that differ clearly between tokens


def test_float64_logits_equal_transformers_as_shipped(pair):
    """With transformers' own float32 RMSNorm statistics the float64 logits differ by ~1e-6 (measured 1.4e-6 and 1.8e-6)."""
    _, _, hf, model = pair
    size = (100, 100)
    ids = torch.tensor([prompt_ids(3, 7, model.num_image_tokens(size), seed=1)])
    pixel_values, image_sizes = pixels(1, 1), torch.tensor([size])
    ref = hf_logits(hf, ids, torch.ones_like(ids), pixel_values, image_sizes, float64_norms=False)
    with torch.no_grad():
        out = model(ids, None, pixel_values, image_sizes)
    assert (out - ref).abs().max() <= 1e-5


def test_left_padded_batch_of_different_image_sizes_equals_transformers(pair):
    """Sample 0: a wide image in a long prompt; sample 1: a large (downsampled) image, left-padded."""
    _, _, hf, model = pair
    sizes = [(40, 110), (100, 100)]
    rows = [prompt_ids(4, 9, model.num_image_tokens(sizes[0]), seed=11),
            prompt_ids(2, 3, model.num_image_tokens(sizes[1]), seed=12)]
    ids, mask = left_pad(rows)
    assert len(rows[0]) != len(rows[1])
    pixel_values, image_sizes = pixels(2, 14), torch.tensor(sizes)
    ref = hf_logits(hf, ids, mask, pixel_values, image_sizes)
    with torch.no_grad():
        out = model(ids, mask, pixel_values, image_sizes)
    valid = mask.bool()
    assert (out[valid] - ref[valid]).abs().max() <= TOL64


def test_multi_image_prompt_and_text_only_sample_equal_transformers(pair):
    """A two-image prompt (batch_num_images [2]) next to a text-only prompt, left-padded."""
    _, _, hf, model = pair
    sizes = [(120, 35), (30, 30)]
    n = [model.num_image_tokens(s, multi_image=True) for s in sizes]
    first = prompt_ids(2, 3, n[0], seed=21) + [IMAGE_TOKEN] * n[1] + [7, 8, 9]
    ids, mask = left_pad([first, prompt_ids(5, 0, 0, seed=22)])
    pixel_values, image_sizes = pixels(2, 23, tiles=MAX_TILES), torch.tensor(sizes)
    ref = hf_logits(hf, ids, mask, pixel_values, image_sizes, torch.tensor([2]))
    with torch.no_grad():
        out = model(ids, mask, pixel_values, image_sizes, torch.tensor([2]))
    valid = mask.bool()
    assert (out[valid] - ref[valid]).abs().max() <= TOL64


def hf_generate(hf, ids, mask, pixel_values, image_sizes, batch_num_images=None, steps: int = STEPS,
                float64_norms: bool = True):
    """transformers' greedy generation (no EOS stop): new tokens [B, steps] and the next-token logits of each
    step [B, steps, V] in the model's dtype. generate hands its logits out in float32, so they are read at
    the LM head instead; `float64_norms` removes the float32 RMSNorm cast as in `hf_logits`."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    logits: list[torch.Tensor] = []
    hook = hf.lm_head.register_forward_hook(lambda _m, _i, out: logits.append(out[:, -1]))
    norm = _rms_norm_in_input_dtype if float64_norms else Qwen2RMSNorm.forward
    try:
        with torch.no_grad(), mock.patch.object(Qwen2RMSNorm, "forward", norm):
            out = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, image_sizes=image_sizes,
                              batch_num_images=batch_num_images, max_new_tokens=steps, min_new_tokens=steps,
                              do_sample=False, eos_token_id=None)
    finally:
        hook.remove()
    assert len(logits) == steps
    return out[:, ids.shape[1]:], torch.stack(logits, dim=1)


@pytest.mark.parametrize("size", SIZES[:4], ids=["small", "large", "wide", "tall"])
def test_greedy_generation_equals_transformers_generate(pair, size):
    """avl.generate (cached prefill + one decode step per token) against transformers' generate."""
    _, _, hf, model = pair
    ids = torch.tensor([prompt_ids(3, 7, model.num_image_tokens(size), seed=sum(size))])
    pixel_values, image_sizes = pixels(1, sum(size)), torch.tensor([size])
    ref_tokens, ref_logits = hf_generate(hf, ids, torch.ones_like(ids), pixel_values, image_sizes)
    out = avl.generate(model, ids, pixel_values=pixel_values, image_sizes=image_sizes, max_new_tokens=STEPS,
                       output_logits=True)
    assert out.logits.dtype == torch.float64 and out.logits.shape == ref_logits.shape
    assert (out.logits - ref_logits).abs().max() <= TOL64
    assert out.tokens.tolist() == ref_tokens.tolist()
    # random tiny models may settle on one repeated token; the logits still move at every step
    assert (out.logits[:, 1:] - out.logits[:, :-1]).abs().amax(-1).min() > 1e-3


def test_left_padded_batch_generation_equals_transformers_generate(pair):
    """Batch of 2, left-padded: a very wide image in a short prompt, a large (downsampled) one in a long one."""
    _, _, hf, model = pair
    sizes = [(80, 300), (100, 100)]
    rows = [prompt_ids(2, 3, model.num_image_tokens(sizes[0]), seed=31),
            prompt_ids(6, 11, model.num_image_tokens(sizes[1]), seed=32)]
    ids, mask = left_pad(rows)
    assert len(rows[0]) != len(rows[1])
    pixel_values, image_sizes = pixels(2, 33), torch.tensor(sizes)
    ref_tokens, ref_logits = hf_generate(hf, ids, mask, pixel_values, image_sizes)
    out = avl.generate(model, ids, pixel_values=pixel_values, image_sizes=image_sizes, attention_mask=mask,
                       max_new_tokens=STEPS, output_logits=True)
    assert (out.logits - ref_logits).abs().max() <= TOL64
    assert out.tokens.tolist() == ref_tokens.tolist()


def test_multi_image_prompt_generation_equals_transformers_generate(pair):
    """A two-image prompt (one tile each) next to a one-image prompt (tiled): batch_num_images [2, 1]."""
    _, _, hf, model = pair
    sizes = [(120, 35), (30, 30), (40, 110)]
    n = [model.num_image_tokens(s, multi_image=True) for s in sizes[:2]]
    first = prompt_ids(2, 3, n[0], seed=41) + [IMAGE_TOKEN] * n[1] + [7, 8, 9]
    ids, mask = left_pad([first, prompt_ids(4, 2, model.num_image_tokens(sizes[2]), seed=42)])
    pixel_values, image_sizes, per_prompt = pixels(3, 43), torch.tensor(sizes), torch.tensor([2, 1])
    ref_tokens, ref_logits = hf_generate(hf, ids, mask, pixel_values, image_sizes, per_prompt)
    out = avl.generate(model, ids, pixel_values=pixel_values, image_sizes=image_sizes, batch_num_images=per_prompt,
                       attention_mask=mask, max_new_tokens=STEPS, output_logits=True)
    assert (out.logits - ref_logits).abs().max() <= TOL64
    assert out.tokens.tolist() == ref_tokens.tolist()


def test_generation_equals_transformers_generate_as_shipped(pair):
    """transformers' own float32 RMSNorm statistics: the same tokens; logits within 1e-5 (measured up to 1.2e-6
    over 16 steps; the issue's bound is 1e-4)."""
    _, _, hf, model = pair
    size = (40, 110)
    ids = torch.tensor([prompt_ids(5, 4, model.num_image_tokens(size), seed=5)])
    pixel_values, image_sizes = pixels(1, 5), torch.tensor([size])
    ref_tokens, ref_logits = hf_generate(hf, ids, torch.ones_like(ids), pixel_values, image_sizes,
                                         float64_norms=False)
    out = avl.generate(model, ids, pixel_values=pixel_values, image_sizes=image_sizes, max_new_tokens=STEPS,
                       output_logits=True)
    assert (out.logits - ref_logits).abs().max() <= 1e-5
    assert out.tokens.tolist() == ref_tokens.tolist()


def test_float32_logits_match_transformers(pair):
    """float32: both sides round differently (SDPA kernels, summation order); 1e-3 absolute on logits of
    magnitude ~10 leaves room without hiding a real error (those move logits by O(1))."""
    _, directory, hf, _ = pair
    model = avl.load(directory, dtype=torch.float32)
    hf32 = hf.to(torch.float32)
    try:
        size = (80, 300)
        ids = torch.tensor([prompt_ids(5, 5, model.num_image_tokens(size), seed=3)])
        pixel_values, image_sizes = pixels(1, 3).float(), torch.tensor([size])
        ref = hf_logits(hf32, ids, torch.ones_like(ids), pixel_values, image_sizes, float64_norms=False)
        with torch.no_grad():
            out = model(ids, None, pixel_values, image_sizes)
        assert out.dtype == torch.float32
        assert (out - ref).abs().max() <= 1e-3
    finally:
        hf.to(torch.float64)


def _hub_layout(name: str, layout: str) -> str:
    """transformers 5's saved names -> the llava-hf hub names or the transformers 4.52-4.57 names."""
    if name.startswith("vision_tower."):
        name = "vision_tower.vision_model." + name[len("vision_tower."):]
    if layout == "llava-hf":
        return name
    if name.startswith("language_model.lm_head."):
        return name[len("language_model."):]
    return "model." + name.replace("language_model.model.", "language_model.", 1)


@pytest.mark.parametrize("layout", ["llava-hf", "transformers-4.52"])
def test_key_map_reads_the_hub_layouts(pair, tmp_path, layout):
    from safetensors.torch import load_file

    _, directory, _, model = pair
    saved = load_file(directory / "model.safetensors")
    assert "vision_tower.post_layernorm.weight" in saved  # written by transformers, dropped by the key map
    renamed = {_hub_layout(k, layout): v for k, v in saved.items()}
    assert ("image_newline" in renamed) == (layout == "llava-hf")
    save_sharded(renamed, tmp_path, max_shard_bytes="200KB", config=json.loads((directory / "config.json").read_text()))
    other = avl.load(tmp_path)
    ours = model.state_dict()
    assert other.state_dict().keys() == ours.keys()
    for key, value in other.state_dict().items():
        assert torch.equal(value, ours[key]), key


def test_missing_tensor_is_named(pair, tmp_path):
    from safetensors.torch import load_file

    _, directory, _, _ = pair
    saved = load_file(directory / "model.safetensors")
    del saved["language_model.model.layers.1.self_attn.k_proj.bias"]
    save_sharded(saved, tmp_path, max_shard_bytes="10MB", config=json.loads((directory / "config.json").read_text()))
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\).*language_model\.layers\.1\.self_attn\.k_proj\.bias"):
        avl.load(tmp_path)


def test_image_token_count_not_matching_the_image_fails_with_both_numbers(pair):
    model = pair[3]
    n = model.num_image_tokens((30, 30))
    ids = torch.tensor([prompt_ids(3, 5, n, seed=0)])
    with pytest.raises(ValueError, match=rf"{n} image tokens \(id 300\) but 1 image\(s\) give "
                                         rf"{model.num_image_tokens((40, 110))} features"):
        model(ids, None, pixels(1, 0), [(40, 110)])
    with pytest.raises(ValueError, match=rf"{n} image tokens .* 0 image\(s\) give 0 features"):
        model(ids)
    with pytest.raises(ValueError, match=r"image_sizes / batch_num_images were given without pixel_values"):
        model(ids, None, None, [(30, 30)])


def test_generate_checks_the_image_inputs_before_prefill(pair):
    """avl.generate goes through the same checks as the dense forward: counts, and the multi-image grouping."""
    model = pair[3]
    n = model.num_image_tokens((30, 30))
    ids = torch.tensor([prompt_ids(3, 5, n, seed=0)])
    with pytest.raises(ValueError, match=rf"{n} image tokens \(id 300\) but 1 image\(s\) give "
                                         rf"{model.num_image_tokens((40, 110))} features"):
        avl.generate(model, ids, pixel_values=pixels(1, 0), image_sizes=torch.tensor([(40, 110)]), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"batch_num_images=\[2\] must be ints >= 1 .* summing to the 1 image"):
        avl.generate(model, ids, pixel_values=pixels(1, 0), image_sizes=torch.tensor([(30, 30)]),
                     batch_num_images=torch.tensor([2]), max_new_tokens=2)


def test_bad_image_inputs_name_the_value(pair):
    model = pair[3]
    ids = torch.tensor([prompt_ids(3, 5, model.num_image_tokens((30, 30)), seed=0)])
    with pytest.raises(ValueError, match=r"image_sizes is required with pixel_values: \[1, 2\]"):
        model(ids, None, pixels(1, 0), None)
    with pytest.raises(ValueError, match=r"image 0 of size \(100, 100\) .* needs 17 tiles .* pixel_values has 5 tiles"):
        model(ids, None, pixels(1, 0, tiles=5), [(100, 100)])
    with pytest.raises(ValueError, match=r"batch_num_images=\[2\] must be ints >= 1 .* summing to the 1 image"):
        model(ids, None, pixels(1, 0), [(30, 30)], [2])
    with pytest.raises(ValueError, match=r"pixel_values must be \[N_images, tiles, 3, 26, 26\] "
                                         r"\(LlavaOnevisionImageProcessor's layout\), got shape \(1, 3, 26, 26\)"):
        model(ids, None, pixels(1, 0)[:, 0], [(30, 30)])


def test_config_rejects_what_it_cannot_run(pair):
    _, directory, _, _ = pair
    raw = json.loads((directory / "config.json").read_text())
    with pytest.raises(ValueError, match=r"vision_feature_select_strategy='default' is not supported; allowed: \['full'\]"):
        LlavaOnevisionConfig.from_dict({**raw, "vision_feature_select_strategy": "default"})
    with pytest.raises(ValueError, match=r"vision_aspect_ratio='anyres' is not supported"):
        LlavaOnevisionConfig.from_dict({**raw, "vision_aspect_ratio": "anyres"})
    with pytest.raises(ValueError, match=r"vision_feature_layer=\[-2, -1\] is not supported"):
        LlavaOnevisionConfig.from_dict({**raw, "vision_feature_layer": [-2, -1]})
    with pytest.raises(ValueError, match=r"text_config.use_sliding_window=True is not supported"):
        LlavaOnevisionConfig.from_dict({**raw, "text_config": {**raw["text_config"], "use_sliding_window": True}})
    yarn = {**raw["text_config"], "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}
    with pytest.raises(ValueError, match=r"text_config.rope_scaling=\{'rope_type': 'yarn'.* is not supported"):
        LlavaOnevisionConfig.from_dict({**raw, "text_config": yarn})
    defaults = LlavaOnevisionConfig.from_dict({"model_type": "llava_onevision"})
    assert (defaults.vision.image_size, defaults.vision.patch_size, defaults.vision.patches_per_side) == (384, 14, 27)
    assert defaults.image_grid_pinpoints[:2] == ((384, 384), (384, 768)) and len(defaults.image_grid_pinpoints) == 36
    assert (defaults.image_token_index, defaults.text.vocab_size) == (151646, 151936)


def noise_image(width: int, height: int, seed: int):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8).numpy())


def test_processor_outputs_give_transformers_logits(tmp_path):
    """End to end: a checkpoint directory (transformers' weights, a tiny Qwen2 tokenizer, hub-style processing
    configs) -> LlavaOnevisionProcessor.from_dir -> `model(**inputs)`, against transformers' model on the same
    inputs; a one-image prompt and a two-image prompt (batch_num_images [1, 2]), left-padded."""
    from avl.processing import LlavaOnevisionProcessor
    from avl.processing.tokenizer import Tokenizer
    from avl.testing.qwen2_tokenizer import build_tiny_qwen2_tokenizer

    tokenizer = Tokenizer.from_dir(build_tiny_qwen2_tokenizer(tmp_path))
    hf = save_hf_onevision(tmp_path, "tied", vocab_size=512, image_token=tokenizer.token_to_id("<image>"),
                           pad_token=tokenizer.pad_token_id)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "LlavaOnevisionImageProcessor", "size": {"height": TILE, "width": TILE},
        "image_grid_pinpoints": PINPOINTS, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "resample": 3}))
    (tmp_path / "processor_config.json").write_text(json.dumps({
        "num_image_tokens": 16, "vision_feature_select_strategy": "full", "vision_aspect_ratio": "anyres_max_9"}))
    processor, model = LlavaOnevisionProcessor.from_dir(tmp_path), avl.load(tmp_path)
    prompts = [processor.prompt("What is in this wide picture?"), processor.prompt("Compare them.", n_images=2)]
    images = [[noise_image(300, 80, 0)], [noise_image(60, 90, 1), noise_image(120, 110, 2)]]
    inputs = processor(prompts, images)
    assert inputs["batch_num_images"].tolist() == [1, 2] and inputs["pixel_values"].dtype == torch.float32
    ref = hf_logits(hf, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], inputs["image_sizes"],
                    inputs["batch_num_images"])
    with torch.no_grad():
        out = model(**inputs)
    valid = inputs["attention_mask"].bool()
    assert (out[valid] - ref[valid]).abs().max() <= TOL64


def test_chat_processor_generation_equals_transformers_generate(tmp_path):
    """`load_chat_processor` on a transformers-written checkpoint directory: llava-hf's chat prompt, the Qwen2
    stop ids, and its inputs through avl.generate give transformers' greedy tokens and float64 logits."""
    from transformers import LlavaOnevisionForConditionalGeneration

    from avl.processing.auto import load_chat_processor
    from tiny_llava import build_tiny_onevision_checkpoint

    directory = build_tiny_onevision_checkpoint(tmp_path / "onevision")
    chat = load_chat_processor(directory)
    tokenizer = chat.processor.tokenizer
    assert chat.prompt("Color?") == "<|im_start|>user <image>\nColor?<|im_end|>\n<|im_start|>assistant\n"
    assert chat.stop_token_ids == (tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>"))
    inputs = chat(["What is in this wide picture?", "Color?"], [noise_image(90, 30, 0), noise_image(40, 60, 1)])
    hf = LlavaOnevisionForConditionalGeneration.from_pretrained(directory, dtype=torch.float64).eval()
    model = avl.load(directory, dtype=torch.float64)
    inputs["pixel_values"] = inputs["pixel_values"].double()
    ref_tokens, ref_logits = hf_generate(hf, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                                         inputs["image_sizes"], inputs["batch_num_images"])
    out = avl.generate(model, **inputs, max_new_tokens=STEPS, output_logits=True)
    assert (out.logits - ref_logits).abs().max() <= TOL64
    assert out.tokens.tolist() == ref_tokens.tolist()
