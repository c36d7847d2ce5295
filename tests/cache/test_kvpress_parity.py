"""The kvpress-pinned policies keep exactly the rows NVIDIA kvpress 0.5.5 keeps.

The fixture (tests/fixtures/kvpress/, made by make_reference.py in a kvpress environment) holds a
tiny random Llama's per-layer queries and keys and what each press kept from them, at compression
ratios 0.5 and 0.3 (avl keep 0.5 and 0.7), on two prompts of 96 and 77 rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from avl.cache.kv_policies import AdaKV, KNorm, ObservedAttention, PyramidKV, RandomEviction, SnapKV

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "kvpress" / "reference.safetensors"
KEEP = {"0.5": 0.5, "0.3": 0.7}  # kvpress compression ratio -> avl keep
LAYERS = 3

# the fixture's press names -> the avl policy with the same settings, at a given keep
POLICIES = {
    "snapkv": lambda keep: SnapKV(keep),
    "snapkv_w8_k3": lambda keep: SnapKV(keep, window_size=8, kernel_size=3),
    "pyramidkv": lambda keep: PyramidKV(keep),
    "pyramidkv_w4_b4": lambda keep: PyramidKV(keep, window_size=4, kernel_size=5, beta=4),
    "knorm": lambda keep: KNorm(keep),
    "observed": lambda keep: ObservedAttention(keep),
    "random": lambda keep: RandomEviction(keep, seed=0),
    "adakv_snapkv": lambda keep: AdaKV(SnapKV(keep), alpha_safeguard=0.2),
    "adakv_snapkv_w8_k3": lambda keep: AdaKV(SnapKV(keep, window_size=8, kernel_size=3), alpha_safeguard=0.2),
    "adakv_knorm_a0": lambda keep: AdaKV(KNorm(keep), alpha_safeguard=0.0),
}


@pytest.fixture(scope="module")
def reference():
    with safe_open(FIXTURE, "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}, f.metadata()


def attn_of(metadata, name: str) -> str:
    return json.loads(metadata["presses"])[name]["attn_implementation"]


def test_the_fixture_is_kvpress_0_5_5_and_covers_every_policy(reference):
    tensors, metadata = reference
    assert metadata["kvpress"] == "0.5.5"
    assert set(json.loads(metadata["presses"])) == set(POLICIES)
    for ratio, keep in KEEP.items():
        assert 1 - float(ratio) == keep  # so avl's keep reproduces kvpress's 1 - compression_ratio exactly


@pytest.mark.parametrize("prompt", ["a", "b"])
@pytest.mark.parametrize("ratio", sorted(KEEP))
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_keep_mask_equals_kvpress(reference, name, ratio, prompt):
    tensors, metadata = reference
    policy = POLICIES[name](KEEP[ratio])
    attn = attn_of(metadata, name)
    for layer in range(LAYERS):
        q, k = tensors[f"q/{attn}/{prompt}/{layer}"], tensors[f"k/{attn}/{prompt}/{layer}"]
        valid = torch.ones(1, k.shape[2], dtype=torch.bool)
        got = policy.prompt_keep(layer, LAYERS, q, k, valid, q.shape[-1] ** -0.5)
        expected = tensors[f"keep/{name}/{ratio}/{prompt}/{layer}"]
        assert got.shape == expected.shape
        assert torch.equal(got, expected), f"layer {layer}: {(got != expected).sum()} rows differ"


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_scores_equal_kvpress(reference, name):
    tensors, metadata = reference
    policy = POLICIES[name](0.5)
    scorer = policy.scorer if isinstance(policy, AdaKV) else policy
    attn = attn_of(metadata, name)
    for prompt in ("a", "b"):
        for layer in range(LAYERS):
            q, k = tensors[f"q/{attn}/{prompt}/{layer}"], tensors[f"k/{attn}/{prompt}/{layer}"]
            valid = torch.ones(1, k.shape[2], dtype=torch.bool)
            got = scorer.scores(q, k, valid, q.shape[-1] ** -0.5)
            # kvpress takes the softmax in float32 (avl too): its rounding depends on the CPU's vector
            # ISA (AVX2 vs AVX-512), so float64 scores agree to float32 precision across machines
            torch.testing.assert_close(got, tensors[f"score/{name}/0.5/{prompt}/{layer}"], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_a_left_padded_batch_keeps_what_each_prompt_keeps_alone(reference, name):
    tensors, metadata = reference
    policy = POLICIES[name](0.7)
    attn = attn_of(metadata, name)
    g = torch.Generator().manual_seed(0)
    for layer in range(LAYERS):
        qs = [tensors[f"q/{attn}/{p}/{layer}"] for p in ("a", "b")]
        ks = [tensors[f"k/{attn}/{p}/{layer}"] for p in ("a", "b")]
        width = max(k.shape[2] for k in ks)
        pad = lambda x: torch.cat([torch.randn(*x.shape[:2], width - x.shape[2], x.shape[3], generator=g,
                                               dtype=x.dtype) * 10, x], dim=2)  # loud garbage in the padding
        q, k = torch.cat([pad(x) for x in qs]), torch.cat([pad(x) for x in ks])
        valid = torch.stack([torch.arange(width) >= width - x.shape[2] for x in ks])
        got = policy.prompt_keep(layer, LAYERS, q, k, valid, q.shape[-1] ** -0.5)
        for b, prompt in enumerate(("a", "b")):
            n = ks[b].shape[2]
            assert not got[b, :, : width - n].any()
            assert torch.equal(got[b:b + 1, :, width - n:], tensors[f"keep/{name}/0.3/{prompt}/{layer}"])


def avl_llama_layer_inputs(metadata, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The tiny Llama of the fixture rebuilt here (same seed and draws as make_reference.py, with this
    environment's transformers), loaded into avl's LlamaModel; each layer's q, k as avl's prefill
    computes them (what the cache hands to `prompt_keep`)."""
    from transformers import LlamaConfig as HFLlamaConfig, LlamaForCausalLM

    from avl.models.layers import prefill_attention
    from avl.models.llama import LlamaConfig, LlamaModel

    raw = json.loads(metadata["model"])
    hf_config = HFLlamaConfig(**{k: raw[k] for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                      "num_hidden_layers", "num_attention_heads",
                                                      "num_key_value_heads", "max_position_embeddings",
                                                      "tie_word_embeddings")})
    torch.manual_seed(0)
    hf = LlamaForCausalLM(hf_config).to(torch.float64)
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    model = LlamaModel(LlamaConfig.from_dict(hf_config.to_dict())).to(torch.float64)
    model.load_state_dict({k.removeprefix("model."): v for k, v in hf.state_dict().items()})
    valid = torch.ones_like(ids, dtype=torch.bool)
    positions = torch.arange(ids.shape[1])[None]
    out = []
    with torch.no_grad():
        h = model.embed_tokens(ids)
        cos, sin = model.rotary(positions, h.dtype)
        for layer in model.layers:
            q, k, v = layer.self_attn.project(layer.input_layernorm(h), cos, sin)
            out.append((q, k))
            h = layer.finish(h, prefill_attention(q, k, v, valid, layer.self_attn.scale))
    return out


@pytest.fixture(scope="module")
def avl_inputs(reference):
    tensors, metadata = reference
    return {prompt: avl_llama_layer_inputs(metadata, tensors[f"ids/{prompt}"]) for prompt in ("a", "b")}


@pytest.mark.parametrize("name", sorted(n for n in POLICIES if n != "observed"))  # observed ran under eager
def test_avls_own_prefill_queries_and_keys_give_kvpress_decisions(reference, avl_inputs, name):
    tensors, metadata = reference
    for prompt, inputs in avl_inputs.items():
        for layer, (q, k) in enumerate(inputs):
            # transformers' Llama takes RMSNorm in float32 even in a float64 model (avl: float64), hence ~1e-6
            torch.testing.assert_close(q, tensors[f"q/sdpa/{prompt}/{layer}"], rtol=0, atol=1e-4)
            torch.testing.assert_close(k, tensors[f"k/sdpa/{prompt}/{layer}"], rtol=0, atol=1e-4)
            for ratio, keep in KEEP.items():
                valid = torch.ones(1, k.shape[2], dtype=torch.bool)
                got = POLICIES[name](keep).prompt_keep(layer, LAYERS, q, k, valid, q.shape[-1] ** -0.5)
                assert torch.equal(got, tensors[f"keep/{name}/{ratio}/{prompt}/{layer}"])
