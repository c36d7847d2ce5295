"""LLaVA-NeXT against transformers' LlavaNextForConditionalGeneration on the same checkpoint files.

Tiny random checkpoints saved by transformers itself: CLIP 24 px tiles / patch 6 (16 features a
tile), grid resolutions 24x48, 48x24, 48x48. A vicuna-style text model (Llama, MHA) and a
mistral-style one (Mistral, 2 KV heads for 4 query heads, rope_theta 1e6).
"""

from __future__ import annotations

import json

import pytest
import torch

import avl
from avl.models.llava_next import LlavaNext, LlavaNextConfig
from avl.weights import save_sharded
from tiny_llava import IMAGE_TOKEN, PAD_TOKEN, left_pad, prompt_ids

PINPOINTS = [[24, 48], [48, 24], [48, 48]]
STEPS = 24
MAX_TILES = 5  # 1 base + a 2x2 grid
# (height, width): 1:1, 2:1 (wide), 1:3 (tall, columns cut), 3:5 (rows cut), 88 / 52 / 40 / 52 tokens
SIZES = [(30, 30), (20, 40), (60, 20), (30, 50)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: intra-op threads only add overhead, and on a shared 2-core machine they stall."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_hf_next_config(variant: str):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, MistralConfig

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=24, patch_size=6, projection_dim=32)
    common = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    if variant == "vicuna":
        text = LlamaConfig(num_key_value_heads=4, rope_theta=10000.0, **common)
    else:
        text = MistralConfig(num_key_value_heads=2, rope_theta=1e6, sliding_window=4096, **common)
    return LlavaNextConfig(vision_config=vision, text_config=text, image_grid_pinpoints=PINPOINTS,
                           image_token_index=IMAGE_TOKEN, pad_token_id=PAD_TOKEN, vision_feature_layer=-2,
                           vision_feature_select_strategy="default")


def save_hf_llava_next(directory, variant: str, seed: int = 0):
    """Random-init a transformers LlavaNextForConditionalGeneration in float64, save it, return it (eval)."""
    from transformers import LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(tiny_hf_next_config(variant)).to(torch.float64).eval()
    with torch.no_grad():  # widen transformers' tiny init so that logits differ clearly between tokens
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
        model.model.image_newline.normal_(0, 1.0)
    model.save_pretrained(directory)
    model.generation_config.eos_token_id = None  # generate all steps without EOS masking, as avl.generate does
    return model


@pytest.fixture(scope="module", params=["vicuna", "mistral"])
def pair(request, tmp_path_factory):
    """(variant, checkpoint dir, transformers model, our model) per text-model style."""
    directory = tmp_path_factory.mktemp(f"hf_next_{request.param}")
    hf = save_hf_llava_next(directory, request.param)
    return request.param, directory, hf, avl.load(directory)


def pixels(n: int, seed: int, tiles: int = MAX_TILES) -> torch.Tensor:
    return torch.randn(n, tiles, 3, 24, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def text_ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 290, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def hf_generate(hf, ids, mask, pixel_values, image_sizes, steps: int = STEPS):
    out = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, image_sizes=image_sizes,
                      max_new_tokens=steps, do_sample=False, output_logits=True,
                      return_dict_in_generate=True)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, dim=1)


def test_load_builds_llava_next_with_the_config(pair):
    variant, _, _, model = pair
    cfg = model.config
    assert isinstance(model, LlavaNext) and isinstance(cfg, LlavaNextConfig)
    assert cfg.image_grid_pinpoints == ((24, 48), (48, 24), (48, 48))
    assert (cfg.text.num_key_value_heads, cfg.text.rope_theta) == ((4, 10000.0) if variant == "vicuna" else (2, 1e6))
    assert cfg.sliding_window == (None if variant == "vicuna" else 4096)
    assert model.dtype == torch.float64


def test_image_features_equal_transformers(pair):
    """The packed features (tiles -> CLIP -> projector -> base + unpadded grid + newlines), one per image."""
    _, _, hf, model = pair
    sizes = torch.tensor(SIZES)
    pixel_values = pixels(len(SIZES), 3)
    with torch.no_grad():
        ref = hf.model.get_image_features(pixel_values, sizes).pooler_output
        ours = model.packed_image_features(pixel_values, SIZES)
    assert [f.shape[0] for f in ours] == [f.shape[0] for f in ref] == [model.num_image_tokens(s) for s in SIZES]
    assert [f.shape[0] for f in ours] == [88, 52, 40, 52]
    for a, b in zip(ours, ref):
        assert (a - b).abs().max() <= 1e-10


@pytest.mark.parametrize("size", SIZES[:3], ids=["1:1", "2:1", "1:3"])
def test_float64_logits_and_greedy_tokens_match_transformers(pair, size):
    _, _, hf, model = pair
    ids = torch.tensor([prompt_ids(3, 7, model.num_image_tokens(size), seed=sum(size))])
    mask = torch.ones_like(ids)
    pixel_values, image_sizes = pixels(1, sum(size)), torch.tensor([size])
    ref_tokens, ref_logits = hf_generate(hf, ids, mask, pixel_values, image_sizes)
    out = avl.generate(model, ids, pixel_values=pixel_values, image_sizes=image_sizes, max_new_tokens=STEPS,
                       output_logits=True)
    assert out.logits.dtype == torch.float64 and out.logits.shape[1] == STEPS
    assert (out.logits - ref_logits).abs().max() <= 1e-4
    assert out.tokens.tolist() == ref_tokens.tolist()
    assert len(set(out.tokens[0].tolist())) > 3  # a real sequence, not one token repeated


def test_batch_of_different_image_sizes_and_two_images_in_one_prompt_match_transformers(pair):
    """Left-padded batch: sample 0 has two images (3:5 then 1:1), sample 1 one image (1:3)."""
    _, _, hf, model = pair
    n = [model.num_image_tokens(s) for s in [(30, 50), (30, 30), (60, 20)]]
    first = prompt_ids(2, 3, n[0], seed=11) + [IMAGE_TOKEN] * n[1] + text_ids(4, seed=12)
    ids, mask = left_pad([first, prompt_ids(6, 9, n[2], seed=13)])
    pixel_values, image_sizes = pixels(3, 14), torch.tensor([(30, 50), (30, 30), (60, 20)])
    ref_tokens, ref_logits = hf_generate(hf, ids, mask, pixel_values, image_sizes, steps=20)
    out = avl.generate(model, ids, pixel_values=pixel_values, image_sizes=image_sizes, attention_mask=mask,
                       max_new_tokens=20, output_logits=True)
    assert (out.logits - ref_logits).abs().max() <= 1e-4
    assert out.tokens.tolist() == ref_tokens.tolist()


def test_float32_matches_transformers(pair):
    """float32: both sides round differently (SDPA kernels, summation order); as for LLaVA-1.5, 2e-3 absolute
    on logits of magnitude ~10 leaves room without hiding a real error (those move logits by O(1))."""
    _, directory, hf, _ = pair
    model = avl.load(directory, dtype=torch.float32)
    hf32 = hf.to(torch.float32)
    try:
        size = (30, 50)
        ids = torch.tensor([prompt_ids(5, 5, model.num_image_tokens(size), seed=3)])
        pixel_values, image_sizes = pixels(1, 3).float(), torch.tensor([size])
        ref_tokens, ref_logits = hf_generate(hf32, ids, torch.ones_like(ids), pixel_values, image_sizes, steps=20)
        out = avl.generate(model, ids, pixel_values=pixel_values, image_sizes=image_sizes, max_new_tokens=20,
                           output_logits=True)
        assert (out.logits - ref_logits).abs().max() <= 2e-3
        assert out.tokens.tolist() == ref_tokens.tolist()
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
    renamed = {_hub_layout(k, layout): v for k, v in saved.items()}
    assert ("image_newline" in renamed) == (layout == "llava-hf")
    save_sharded(renamed, tmp_path, max_shard_bytes="200KB", config=json.loads((directory / "config.json").read_text()))
    other = avl.load(tmp_path)
    ours = model.state_dict()
    assert other.state_dict().keys() == ours.keys()
    for key, value in other.state_dict().items():
        assert torch.equal(value, ours[key]), key


def one_image_prompt(model: LlavaNext, size=(30, 30)) -> torch.Tensor:
    return torch.tensor([prompt_ids(3, 5, model.num_image_tokens(size), seed=0)])


def prefill(model, ids, pixel_values, image_sizes, mask=None):
    mask = torch.ones_like(ids) if mask is None else mask
    return model.prefill(ids, mask, pixel_values, avl.Full(), 4, image_sizes=image_sizes)


def test_image_token_count_not_matching_the_image_fails_with_both_numbers(pair):
    model = pair[3]
    ids = one_image_prompt(model, (30, 30))  # 88 image tokens
    with pytest.raises(ValueError, match=r"88 image tokens \(id 300\) but 1 image\(s\) give 52 features"):
        prefill(model, ids, pixels(1, 0), [(20, 40)])
    with pytest.raises(ValueError, match=r"88 image tokens .* 0 image\(s\) give 0 features"):
        prefill(model, ids, None, None)
    with pytest.raises(ValueError, match="image_sizes was given without pixel_values"):
        prefill(model, ids, None, [(30, 30)])
    with pytest.raises(ValueError, match=r"88 image tokens .* 2 image\(s\) give 176 features"):
        prefill(model, ids, pixels(2, 0), [(30, 30), (30, 30)])


def test_image_tokens_of_a_sample_must_cover_whole_images(pair):
    """Totals agree (88 + 52 = 140 = 70 + 70) but sample 0's tokens end inside image 1."""
    model = pair[3]
    ids, mask = left_pad([prompt_ids(2, 3, 70, seed=0), prompt_ids(2, 3, 70, seed=1)])
    with pytest.raises(ValueError, match=r"sample 0's image tokens end at image feature 70, inside an image.*"
                                         r"\[88, 52\]"):
        prefill(model, ids, pixels(2, 0), [(30, 30), (20, 40)], mask)


def test_image_sizes_missing_or_inconsistent_with_pixel_values(pair):
    model = pair[3]
    ids = one_image_prompt(model)
    with pytest.raises(ValueError, match=r"image_sizes is required with pixel_values: \[1, 2\]"):
        prefill(model, ids, pixels(1, 0), None)
    with pytest.raises(ValueError, match=r"image_sizes must be an integer tensor \[1, 2\].* shape \(2, 2\)"):
        prefill(model, ids, pixels(1, 0), [(30, 30), (30, 30)])
    with pytest.raises(ValueError, match=r"image_sizes must be an integer tensor \[1, 2\].* shape \(2,\)"):
        prefill(model, ids, pixels(1, 0), torch.tensor([30, 30]))
    with pytest.raises(ValueError, match=r"integer tensor .*torch.float32"):
        prefill(model, ids, pixels(1, 0), torch.tensor([[30.0, 30.0]]))
    with pytest.raises(ValueError, match=r"\(height, width\), two positive ints; got \[0, 30\]"):
        prefill(model, ids, pixels(1, 0), [(0, 30)])
    with pytest.raises(ValueError, match=r"image 0 of size \(30, 30\) .* needs 5 tiles .* pixel_values has 3 tiles"):
        prefill(model, ids, pixels(1, 0, tiles=3), [(30, 30)])


def test_pixel_values_must_be_the_tiled_layout(pair):
    model = pair[3]
    ids = one_image_prompt(model)
    with pytest.raises(ValueError, match=r"pixel_values must be \[N_images, tiles, 3, 24, 24\].*\(1, 3, 24, 24\)"):
        prefill(model, ids, pixels(1, 0)[:, 0], [(30, 30)])
    with pytest.raises(ValueError, match=r"got shape \(1, 5, 3, 48, 48\)"):
        prefill(model, ids, torch.zeros(1, 5, 3, 48, 48, dtype=torch.float64), [(30, 30)])
