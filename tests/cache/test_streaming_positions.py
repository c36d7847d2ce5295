"""StreamingLLM's two position rules against an independent emulation of the original release.

The emulation rebuilds, in plain torch on transformers' own modules and weights (float64), what
mit-han-lab/streaming-llm does with `enable_pos_shift` (`pos_shift/modify_llama.py`) and
`StartRecentKVCache(start_size, recent_size)` called after every forward (`examples/eval_long_ppl.py`):

- prefill: the prompt at positions 0..L-1 (queries and keys), dense causal attention; the cache
  holds the keys UNROTATED;
- after each forward, a cache longer than start + recent keeps its first `start` and last `recent` rows;
- a decode step appends the new token's unrotated key, rotates every cached key at its index in the
  cache (0..n) and the query at n (the cache length before the token, transformers' position_ids).

With `shift=False` the same cache keeps keys rotated at their original positions and the query at
its own position (avl's `positions="original"`).

avl's shifted cache does not re-rotate its keys: it rotates the query, the new key and the sinks so
that every score equals the original's (RoPE scores depend on position differences only). With
rotary tables in float32, as transformers and avl take them, the two differ by the tables' rounding
at different positions (about 1e-6 in the logits after 20 steps); with exact (float64) tables on
both sides they agree to float64 rounding.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import rotate_half

import avl
from tiny_llava import prompt_ids, save_hf_llava

STEPS = 20


def rms_norm(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    return norm.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)


def hf_prompt_embeddings(hf, ids: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """The embeddings transformers' LLaVA feeds its language model (image features merged in)."""
    seen = {}

    def grab(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    handle = hf.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            hf(input_ids=ids, pixel_values=pixels)
    finally:
        handle.remove()
    return seen["embeds"]


def exact_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables [B, 1, L, D] computed in float64 (avl's `rotary_cos_sin` signature)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = positions.to(torch.float64)[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)[:, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


@torch.no_grad()
def emulate(hf, ids: torch.Tensor, pixels: torch.Tensor, start: int, recent: int, steps: int,
            shift: bool, exact_tables: bool = False) -> torch.Tensor:
    """Greedy logits [steps + 1, V] of the original StreamingLLM on a batch of one (`exact_tables`:
    rotary tables in float64 instead of transformers' float32 ones)."""
    lm, cfg = hf.model.language_model, hf.config.text_config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    dim = cfg.hidden_size // heads

    def rope(x: torch.Tensor, positions: list[int]) -> torch.Tensor:  # x [1, H, N, D]
        if exact_tables:
            cos, sin = exact_cos_sin(torch.tensor([positions]), dim, cfg.rope_parameters["rope_theta"], x.dtype)
        else:
            cos, sin = (t[:, None] for t in lm.rotary_emb(x, torch.tensor([positions])))
        return x * cos + rotate_half(x) * sin

    def split(x: torch.Tensor, n_heads: int) -> torch.Tensor:
        return x.view(1, -1, n_heads, dim).transpose(1, 2)

    keys = [None] * len(lm.layers)
    values = [None] * len(lm.layers)
    h = hf_prompt_embeddings(hf, ids, pixels)
    length = h.shape[1]
    positions = list(range(length))  # the prompt's own positions (both rules)
    logits = []
    for step in range(steps + 1):
        n = h.shape[1]
        for i, layer in enumerate(lm.layers):
            attn = layer.self_attn
            x = rms_norm(h, layer.input_layernorm)
            q, k, v = split(attn.q_proj(x), heads), split(attn.k_proj(x), kv_heads), split(attn.v_proj(x), kv_heads)
            past = 0 if keys[i] is None else keys[i].shape[2]
            if shift:
                q = rope(q, list(range(past, past + n)))
                keys[i] = k if keys[i] is None else torch.cat([keys[i], k], dim=2)
                k_all = rope(keys[i], list(range(past + n)))
            else:
                q, k = rope(q, positions), rope(k, positions)
                keys[i] = k if keys[i] is None else torch.cat([keys[i], k], dim=2)
                k_all = keys[i]
            values[i] = v if values[i] is None else torch.cat([values[i], v], dim=2)
            groups = heads // kv_heads
            scores = q @ k_all.repeat_interleave(groups, 1).transpose(2, 3) * dim**-0.5
            causal = torch.ones(n, past + n, dtype=torch.bool).tril(past)
            probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
            out = (probs @ values[i].repeat_interleave(groups, 1)).transpose(1, 2).reshape(1, n, -1)
            h = h + attn.o_proj(out)
            h = h + layer.mlp(rms_norm(h, layer.post_attention_layernorm))
            if keys[i].shape[2] > start + recent:  # StartRecentKVCache.__call__ after the forward
                keys[i] = torch.cat([keys[i][:, :, :start], keys[i][:, :, -recent:]], dim=2)
                values[i] = torch.cat([values[i][:, :, :start], values[i][:, :, -recent:]], dim=2)
        logits.append(hf.lm_head(rms_norm(h[:, -1], lm.norm))[0])
        token = logits[-1].argmax()
        h = lm.embed_tokens(token)[None, None]
        positions = [length + step]
    return torch.stack(logits)


@pytest.fixture(scope="module")
def gqa_llava(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gqa_llava")
    return directory, save_hf_llava(directory, seed=3, num_key_value_heads=2)


@pytest.mark.parametrize("exact_tables", [False, True], ids=["float32-tables", "float64-tables"])
@pytest.mark.parametrize("checkpoint", ["hf_llava", "gqa_llava"])
@pytest.mark.parametrize("positions", ["shifted", "original"])
def test_streaming_llm_matches_the_emulated_original_over_20_steps(request, monkeypatch, checkpoint, positions,
                                                                   exact_tables):
    """A prompt of 27 rows with 4 sinks + a window of 8: the window is full from the first step."""
    directory, hf = request.getfixturevalue(checkpoint)
    if exact_tables:
        monkeypatch.setattr(avl.models.llama, "rotary_cos_sin", exact_cos_sin)
    model = avl.load(directory)
    ids = torch.tensor([prompt_ids(3, 7, 16, seed=4)])
    pixels = torch.randn(1, 3, 48, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    assert ids.shape[1] > 4 + 8
    expected = emulate(hf, ids, pixels, start=4, recent=8, steps=STEPS, shift=positions == "shifted",
                       exact_tables=exact_tables)
    out = avl.generate(model, ids, pixel_values=pixels, policy=avl.StreamingLLM(sinks=4, window=8, positions=positions),
                       max_new_tokens=STEPS + 1, output_logits=True)
    assert out.tokens[0].tolist() == expected.argmax(-1).tolist()
    # float32 tables: the shifted cache takes them at other positions than the original (module docstring)
    tolerance = 1e-12 if exact_tables or positions == "original" else 1e-5
    assert (out.logits[0] - expected).abs().max() <= tolerance


def test_the_two_position_rules_differ_once_the_window_slides(hf_llava):
    """The emulation tells the rules apart: what it accepts for one it rejects for the other."""
    directory, hf = hf_llava
    ids = torch.tensor([prompt_ids(3, 7, 16, seed=4)])
    pixels = torch.randn(1, 3, 48, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    shifted, original = (emulate(hf, ids, pixels, 4, 8, STEPS, shift) for shift in (True, False))
    assert torch.equal(shifted[0], original[0])  # the prefill is the same
    assert (shifted[1:] - original[1:]).abs().max() > 1e-2


def test_positions_is_validated():
    with pytest.raises(ValueError, match="positions='rope'.*allowed: 'shifted'.*'original'"):
        avl.StreamingLLM(positions="rope")
    assert avl.StreamingLLM().positions == "shifted"


def test_a_shifted_cache_refuses_a_step_without_its_rotation():
    from avl.cache.layout import Modality, PromptLayout
    from avl.cache.policies import build_layer_cache

    layout = PromptLayout.from_prompt(torch.zeros(1, 6, dtype=torch.bool), torch.ones(1, 6, dtype=torch.long))
    k, v = torch.randn(2, 1, 2, 6, 4)
    cache = build_layer_cache(avl.StreamingLLM(sinks=1, window=2), layout, k, v, layout.count(Modality.IMAGE),
                              None, None, new_tokens=2)
    assert cache.shifted and torch.equal(cache.k[:, :, 0], k[:, :, 0])  # the sink, as given
    q, k_new, v_new = torch.randn(3, 1, 2, 1, 4)
    with pytest.raises(ValueError, match="positions inside it.*needs `rotate`"):
        cache.step(q, k_new, v_new, 0.5, False, cache.live.shape[2] - 1)
