"""End to end: `avl.generate` with each kvpress-pinned policy gives kvpress 0.5.5's greedy generation.

The fixture (tests/fixtures/kvpress/generation.safetensors and the tiny LLaVA in llava-tiny/, made
by make_generation_reference.py in the kvpress environment) holds, for each press at compression
ratios 0.5 and 0.3 (avl keep 0.5 and 0.7), the 12 greedy tokens and the logits before each choice
of transformers' `LlavaForConditionalGeneration` under the press, in float64, on one 102-row prompt
(16 image rows). avl runs the same checkpoint in float64. Pass: the same tokens, logits within 1e-4
(transformers takes RMSNorm in float32 even in a float64 model, hence ~1e-6, not 1e-12).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import avl
from avl.cache.kv_policies import AdaKV, KNorm, ObservedAttention, PyramidKV, RandomEviction, SnapKV

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "kvpress"
KEEP = {"0.5": 0.5, "0.3": 0.7}  # kvpress compression ratio -> avl keep
TOLERANCE = 1e-4

# the fixture's press names -> the avl policy with the same settings, at a given keep
POLICIES = {
    "snapkv": lambda keep: SnapKV(keep),
    "pyramidkv": lambda keep: PyramidKV(keep),
    "pyramidkv_w4_b4": lambda keep: PyramidKV(keep, window_size=4, kernel_size=5, beta=4),
    "knorm": lambda keep: KNorm(keep),
    "observed": lambda keep: ObservedAttention(keep),
    "random": lambda keep: RandomEviction(keep, seed=0),
    "adakv_snapkv": lambda keep: AdaKV(SnapKV(keep), alpha_safeguard=0.2),
    "adakv_knorm_a0": lambda keep: AdaKV(KNorm(keep), alpha_safeguard=0.0),
}


@pytest.fixture(scope="module")
def reference():
    with safe_open(FIXTURE / "generation.safetensors", "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}, f.metadata()


@pytest.fixture(scope="module")
def model():
    return avl.load(FIXTURE / "llava-tiny", dtype=torch.float64)


def run(model, tensors, policy):
    new = tensors["tokens/full"].shape[0]
    return avl.generate(model, tensors["ids"], pixel_values=tensors["pixel_values"], policy=policy,
                        max_new_tokens=new, output_logits=True)


def test_the_fixture_is_kvpress_0_5_5_and_covers_every_policy(reference):
    tensors, metadata = reference
    assert metadata["kvpress"] == "0.5.5"
    assert set(json.loads(metadata["presses"])) == set(POLICIES)
    assert tensors["ids"].shape[1] > 64  # longer than SnapKV's default window


def test_the_full_cache_equals_transformers_without_a_press(model, reference):
    tensors, _ = reference
    out = run(model, tensors, avl.Full())
    assert out.tokens[0].tolist() == tensors["tokens/full"].tolist()
    assert (out.logits[0] - tensors["logits/full"]).abs().max() <= TOLERANCE


@pytest.mark.parametrize("ratio", sorted(KEEP))
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_generation_equals_kvpress(model, reference, name, ratio):
    tensors, _ = reference
    policy = POLICIES[name](KEEP[ratio])
    out = run(model, tensors, policy)
    expected = tensors[f"tokens/{name}/{ratio}"]
    assert out.tokens[0].tolist() == expected.tolist()
    assert (out.logits[0] - tensors[f"logits/{name}/{ratio}"]).abs().max() <= TOLERANCE
    # compressed: every layer stores fewer rows than the full cache of the same generation
    assert all(s.stored_rows < s.full_rows for s in out.stats.layers)
    assert not torch.equal(expected, tensors["tokens/full"])  # the press changed the generation
