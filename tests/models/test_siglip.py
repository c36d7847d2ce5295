"""SigLIP vision tower against transformers' SiglipVisionModel (float64, same weights)."""

from __future__ import annotations

import pytest
import torch

from avl.models.siglip import SiglipVisionConfig, SiglipVisionTower

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=24,
            patch_size=6)


@pytest.fixture(scope="module")
def pair():
    """(transformers SiglipVisionModel (SDPA attention), our tower with its weights), float64."""
    from transformers import SiglipVisionConfig as HFConfig
    from transformers import SiglipVisionModel

    torch.manual_seed(0)
    hf = SiglipVisionModel(HFConfig(**TINY, vision_use_head=False))
    hf = hf.to(torch.float64).eval()
    with torch.no_grad():  # transformers' init is tiny; widen it so that layers differ clearly
        for p in hf.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.add_(torch.randn_like(p) * 0.1)
    ours = SiglipVisionTower(SiglipVisionConfig.from_dict(hf.config.to_dict())).to(torch.float64)
    state = {k: v for k, v in hf.state_dict().items() if not k.startswith("post_layernorm.")}
    ours.load_state_dict(state, strict=True)
    return hf, ours


def pixels(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 24, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layer", [-1, -2, 0, 1, 3])
def test_hidden_states_equal_transformers(pair, layer):
    hf, ours = pair
    x = pixels(2, layer + 10)
    with torch.no_grad():
        ref = hf(x, output_hidden_states=True).hidden_states
        out = ours(x, layer)
    assert len(ref) == 4 and out.attention is None
    assert out.hidden.shape == (2, 16, 32)
    assert (out.hidden - ref[layer]).abs().max() <= 1e-12


def test_last_hidden_state_is_before_post_layernorm(pair):
    """OneVision's `hidden_states[-1]` is the last block's output, not transformers' `last_hidden_state`."""
    hf, ours = pair
    x = pixels(1, 0)
    with torch.no_grad():
        out = hf(x, output_hidden_states=True)
        assert (ours(x).hidden - out.hidden_states[-1]).abs().max() <= 1e-12
        assert (ours(x).hidden - out.last_hidden_state).abs().max() > 1e-2


@pytest.mark.parametrize("attention_layer", [0, 2, -1])
def test_attention_probabilities_equal_transformers_eager(pair, attention_layer):
    """transformers' eager attention (the one that returns probabilities) takes the softmax in float32, so
    its probabilities and outputs agree to ~1e-7 only; SDPA's outputs give the float64 check of ours."""
    hf, ours = pair
    x = pixels(2, 5)
    hf.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            ref = hf(x, output_attentions=True)
    finally:
        hf.set_attn_implementation("sdpa")
    with torch.no_grad():
        out = ours(x, -1, attention_layer=attention_layer)
        dense = hf(x, output_hidden_states=True).hidden_states[-1]
    assert out.attention.shape == (2, 4, 16, 16) and out.attention.dtype == torch.float64
    assert (out.attention - ref.attentions[attention_layer]).abs().max() <= 1e-6
    assert (out.attention.sum(-1) - 1).abs().max() <= 1e-12
    assert (out.hidden - dense).abs().max() <= 1e-12  # the probed layer's output is unchanged


def test_bad_arguments_name_the_value(pair):
    _, ours = pair
    with pytest.raises(ValueError, match=r"vision_feature_layer=4 is not supported; allowed: an int in \[-4, 3\]"):
        ours(pixels(1, 0), 4)
    with pytest.raises(ValueError, match=r"attention_layer=3 is not supported; allowed: an int in \[-3, 2\]"):
        ours(pixels(1, 0), -1, attention_layer=3)
    with pytest.raises(ValueError, match=r"attention_layer=1 .*\(encoder layers 0\.\.0\)"):
        ours(pixels(1, 0), 1, attention_layer=1)
    with pytest.raises(ValueError, match=r"pixel_values must be \[N, 3, 24, 24\], got shape \(1, 3, 48, 48\)"):
        ours(torch.zeros(1, 3, 48, 48, dtype=torch.float64))


def test_config_defaults_are_siglips_and_bad_values_fail():
    cfg = SiglipVisionConfig.from_dict({})
    assert (cfg.hidden_act, cfg.layer_norm_eps, cfg.image_size, cfg.patch_size) == ("gelu_pytorch_tanh", 1e-6, 224, 16)
    with pytest.raises(ValueError, match=r"vision_config.hidden_act='relu' is not supported"):
        SiglipVisionConfig.from_dict({"hidden_act": "relu"})
