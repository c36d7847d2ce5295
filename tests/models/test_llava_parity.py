"""LLaVA-1.5 against transformers' LlavaForConditionalGeneration on the same checkpoint files."""

from __future__ import annotations

import pytest
import torch

import avl
from tiny_llava import prompt_ids, save_hf_llava

STEPS = 24


def hf_generate(hf, ids: torch.Tensor, pixels: torch.Tensor, steps: int = STEPS):
    out = hf.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                      min_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("seed", [0, 1])
def test_float64_logits_and_greedy_tokens_match_transformers(hf_llava, seed):
    directory, hf = hf_llava
    model = avl.load(directory)
    ids = torch.tensor([prompt_ids(3 + seed, 7, 16, seed)])
    pixels = torch.randn(1, 3, 48, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    ref_tokens, ref_logits = hf_generate(hf, ids, pixels)
    out = avl.generate(model, ids, pixel_values=pixels, max_new_tokens=STEPS, output_logits=True)
    assert out.logits.dtype == torch.float64
    assert (out.logits - ref_logits).abs().max() <= 1e-4
    assert out.tokens.tolist() == ref_tokens.tolist()


def test_float32_matches_transformers(hf_llava):
    """float32: both sides round differently (SDPA kernels, summation order); logits of magnitude ~10
    agree to a few 1e-5 relative, so 2e-3 absolute leaves room without hiding a real error (a wrong
    position, mask or feature layer moves logits by O(1))."""
    directory, hf = hf_llava
    model = avl.load(directory, dtype=torch.float32)
    hf32 = hf.to(torch.float32)
    try:
        ids = torch.tensor([prompt_ids(5, 5, 16, 3)])
        pixels = torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(3))
        ref_tokens, ref_logits = hf_generate(hf32, ids, pixels)
        out = avl.generate(model, ids, pixel_values=pixels, max_new_tokens=STEPS, output_logits=True)
        assert (out.logits - ref_logits).abs().max() <= 2e-3
        assert out.tokens.tolist() == ref_tokens.tolist()
    finally:
        hf.to(torch.float64)


def test_gqa_and_rope_theta_are_config_switches(tmp_path):
    """Mistral-style: 2 KV heads for 4 query heads, rope_theta 1e6."""
    hf = save_hf_llava(tmp_path, seed=5, num_key_value_heads=2, rope_theta=1e6)
    model = avl.load(tmp_path)
    assert model.config.text.num_key_value_heads == 2 and model.config.text.rope_theta == 1e6
    ids = torch.tensor([prompt_ids(2, 9, 16, 5)])
    pixels = torch.randn(1, 3, 48, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    ref_tokens, ref_logits = hf_generate(hf, ids, pixels, steps=20)
    out = avl.generate(model, ids, pixel_values=pixels, max_new_tokens=20, output_logits=True)
    assert (out.logits - ref_logits).abs().max() <= 1e-4
    assert out.tokens.tolist() == ref_tokens.tolist()
