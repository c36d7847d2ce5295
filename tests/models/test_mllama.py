"""Llama-3.2-Vision (mllama) against transformers' MllamaForConditionalGeneration on the same checkpoint
files, the Trim policy (Trimmed Llama) against a plain reference selection, batching, and bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import avl
from avl.cache.layout import PromptLayout
from avl.cache.policies import AVL, H2O, FastV, Full, Policy, StreamingLLM
from avl.cache.trim import Trim
from avl.models.mllama import Mllama, MllamaConfig
from avl.weights import KeyMap, load_checkpoint, read_config

IMAGE = 300  # <|image|> id = vocab_size, as in the hub config (128256)
PAD = 299
STEPS = 20
TILE = 28  # 28 px / patch 14 -> 4 patches + class token = 5 feature rows per tile (padded to 8 in the encoder)
PER_TILE = 5
RATIOS = [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1)]  # aspect-ratio id - 1 -> (rows, cols)


def hf_config(**text):
    """Tiny Llama-3.2-Vision config: 2 of 5 text layers cross-attend, GQA 4/2, llama3 rope scaling."""
    from transformers import MllamaConfig as HFMllamaConfig

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_global_layers=2, attention_heads=4,
                  image_size=TILE, patch_size=14, max_num_tiles=4, intermediate_layers_indices=[0, 2],
                  vision_output_dim=96)
    rope = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=64)
    text = dict(dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=5, num_attention_heads=4,
                     num_key_value_heads=2, cross_attention_layers=[1, 3], rope_parameters=rope,
                     max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=PAD), **text)
    return HFMllamaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE)


def save_hf_mllama(directory: Path, seed: int = 0, **text):
    """Random-init transformers' model in float64 with every gate open (transformers zeroes them), save it."""
    from transformers import MllamaForConditionalGeneration

    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(hf_config(**text)).to(torch.float64).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
            elif "gate" in name:
                p.uniform_(0.3, 1.2)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.1)
    model.save_pretrained(directory)
    return model


def load(directory: Path, dtype: torch.dtype | None = None) -> Mllama:
    """`avl.load` once model_type "mllama" is registered; until then the same steps by hand."""
    from avl.families import FAMILIES

    if "mllama" in FAMILIES:
        return avl.load(directory, dtype=dtype)
    config = MllamaConfig.from_dict(read_config(directory))
    with torch.device("meta"):
        model = Mllama(config)
    load_checkpoint(model, directory, KeyMap(Mllama.key_map), dtype=dtype, tied=model.tied_weights)
    return model.eval()


def prompt(n_before: int, n_after: int, seed: int, images: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, 290, (n_before + n_after,), generator=g).tolist()
    return [1, *text[:n_before], *[IMAGE] * images, *text[n_before:]]


def batch(prompts: list[list[int]], ratio_ids: list[list[int]], seed: int) -> dict[str, torch.Tensor]:
    """Left-padded inputs as MllamaProcessor gives them: random tiles for each image's layout, zero padding
    tiles, and each image attended from its <|image|> token to the next one (or the end)."""
    g = torch.Generator().manual_seed(seed)
    b, length, n_images = len(prompts), max(map(len, prompts)), max(map(len, ratio_ids))
    out = dict(input_ids=torch.full((b, length), PAD), attention_mask=torch.zeros(b, length, dtype=torch.long),
               pixel_values=torch.zeros(b, n_images, 4, 3, TILE, TILE, dtype=torch.float64),
               aspect_ratio_ids=torch.zeros(b, n_images, dtype=torch.long),
               aspect_ratio_mask=torch.zeros(b, n_images, 4, dtype=torch.long),
               cross_attention_mask=torch.zeros(b, length, n_images, 4, dtype=torch.long))
    out["aspect_ratio_mask"][:, :, 0] = 1
    for i, (row, ids) in enumerate(zip(prompts, ratio_ids)):
        offset = length - len(row)
        out["input_ids"][i, offset:] = torch.tensor(row)
        out["attention_mask"][i, offset:] = 1
        starts = [offset + p for p, t in enumerate(row) if t == IMAGE] + [length]
        for j, ratio in enumerate(ids):
            tiles = RATIOS[ratio - 1][0] * RATIOS[ratio - 1][1]
            out["pixel_values"][i, j, :tiles] = torch.randn(tiles, 3, TILE, TILE, generator=g, dtype=torch.float64)
            out["aspect_ratio_ids"][i, j] = ratio
            out["aspect_ratio_mask"][i, j, :tiles] = 1
            if j + 1 < len(starts):  # an image without its <|image|> token attends nothing
                out["cross_attention_mask"][i, starts[j]:starts[j + 1], j, :tiles] = 1
    return out


def split(inputs: dict) -> tuple[tuple, dict]:
    """(input_ids, attention_mask, pixel_values) and the keyword inputs of `prefill`."""
    rest = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "pixel_values")}
    return (inputs["input_ids"], inputs["attention_mask"], inputs.get("pixel_values")), rest


@torch.inference_mode()
def greedy(model: Mllama, inputs: dict, policy: Policy = Full(), steps: int = STEPS, decode=None,
           features: Trim | None = None):
    """prefill + greedy decode steps: tokens [B, steps], logits [B, steps, V], the cache."""
    args, kwargs = split(inputs)
    logits, cache = model.prefill(*args, policy, steps - 1, features, **kwargs)
    step = decode or model.decode
    tokens, all_logits = [], []
    for t in range(steps):
        all_logits.append(logits)
        tokens.append(logits.argmax(-1))
        if t < steps - 1:
            logits = step(tokens[-1], cache, cache.next_step())
    return torch.stack(tokens, 1), torch.stack(all_logits, 1), cache


@torch.inference_mode()
def hf_greedy(hf, inputs: dict, steps: int = STEPS):
    out = hf.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_logits=True,
                      return_dict_in_generate=True)
    return out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(out.logits, dim=1)


@pytest.fixture(scope="module")
def hf_mllama(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf_mllama")
    return directory, save_hf_mllama(directory)


@pytest.fixture(scope="module")
def model(hf_mllama):
    return load(hf_mllama[0])


# ---------------------------------------------------------------- parity with transformers

@pytest.mark.parametrize("ratios", [[1], [2], [3], [6], [[4], [8]]], ids=["1x1", "1x2", "1x3", "2x2", "1x4+4x1"])
def test_vision_features_match_transformers(hf_mllama, model, ratios):
    ratios = ratios if isinstance(ratios[0], list) else [ratios]
    inputs = batch([prompt(2, 3, i) for i in range(len(ratios))], ratios, seed=len(ratios))
    with torch.inference_mode():
        ref = hf_mllama[1].model.vision_model(pixel_values=inputs["pixel_values"],
                                              aspect_ratio_ids=inputs["aspect_ratio_ids"],
                                              aspect_ratio_mask=inputs["aspect_ratio_mask"]).last_hidden_state
        ours = model.vision_model(inputs["pixel_values"], inputs["aspect_ratio_ids"], inputs["aspect_ratio_mask"])
    assert ours.shape == ref.shape == (len(ratios), 1, 4, PER_TILE, 96)
    assert (ours - ref).abs().max() <= 1e-10


@pytest.mark.parametrize("ratio", [1, 2, 3, 6], ids=["1-tile", "2-tiles", "3-tiles", "4-tiles"])
def test_float64_logits_and_greedy_tokens_match_transformers(hf_mllama, model, ratio):
    inputs = batch([prompt(3 + ratio, 6, ratio)], [[ratio]], seed=ratio)
    ref_tokens, ref_logits = hf_greedy(hf_mllama[1], inputs)
    tokens, logits, _ = greedy(model, inputs)
    assert logits.dtype == torch.float64
    assert (logits[:, 0] - ref_logits[:, 0]).abs().max() <= 1e-4  # prefill
    assert (logits - ref_logits).abs().max() <= 1e-4
    assert tokens.tolist() == ref_tokens.tolist()


def test_two_images_and_a_left_padded_batch_match_transformers(hf_mllama, model):
    """Two images in one prompt (each attended from its own <|image|> token on), and a left-padded batch."""
    inputs = batch([prompt(2, 5, 11, images=1) + [7, 8, IMAGE, 9, 10, 11], prompt(6, 2, 12) + [IMAGE, 13]],
                   [[3, 5], [1, 6]], seed=4)
    ref_tokens, ref_logits = hf_greedy(hf_mllama[1], inputs)
    tokens, logits, _ = greedy(model, inputs)
    assert (logits - ref_logits).abs().max() <= 1e-4
    assert tokens.tolist() == ref_tokens.tolist()


def test_text_only_prompt_skips_the_cross_attention_layers_like_transformers(hf_mllama, model):
    ids = torch.tensor([[1, 5, 9, 33, 71, 2, 18]])
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    ref_tokens, ref_logits = hf_greedy(hf_mllama[1], inputs)
    tokens, logits, cache = greedy(model, inputs)
    assert cache.cross == []
    assert (logits - ref_logits).abs().max() <= 1e-4
    assert tokens.tolist() == ref_tokens.tolist()


def test_float32_matches_transformers(hf_mllama):
    """float32 on both sides: rounding differs (kernels, summation order), a real error moves logits by O(1)."""
    directory, hf = hf_mllama
    model = load(directory, dtype=torch.float32)
    hf32 = hf.to(torch.float32)
    try:
        inputs = batch([prompt(4, 6, 21)], [[6]], seed=21)
        inputs["pixel_values"] = inputs["pixel_values"].float()
        ref_tokens, ref_logits = hf_greedy(hf32, inputs, steps=10)
        tokens, logits, _ = greedy(model, inputs, steps=10)
        assert (logits - ref_logits).abs().max() <= 2e-3
        assert tokens.tolist() == ref_tokens.tolist()
    finally:
        hf.to(torch.float64)


# ---------------------------------------------------------------- Trim (Trimmed Llama)

def reference_kept_rows(hf, inputs: dict, keep: float, criterion: str) -> list[set[int]]:
    """The kept feature rows, computed plainly from transformers' first cross-attention layer: its inputs are
    captured with a hook, probabilities recomputed in float64 with transformers' own mask; text rows that
    attend some tile vote; real (non-padding) rows compete for int(keep * n) places per sample (per head for
    "head_union", then the union)."""
    layer = hf.model.language_model.layers[hf.config.text_config.cross_attention_layers[0]].cross_attn
    captured = {}
    handle = layer.register_forward_hook(lambda mod, args, kwargs, out: captured.update(kwargs), with_kwargs=True)
    with torch.inference_mode():
        hf(**inputs)
    handle.remove()
    h, states, mask = captured["hidden_states"], captured["cross_attention_states"], captured["attention_mask"]
    b, length, _ = h.shape
    heads, kv_heads, dim = layer.num_heads, layer.num_key_value_heads, layer.head_dim
    with torch.inference_mode():
        q = layer.q_norm(layer.q_proj(h).view(b, length, heads, dim).transpose(1, 2))
        k = layer.k_norm(layer.k_proj(states).view(b, -1, kv_heads, dim).transpose(1, 2))
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        probs = torch.softmax(q @ k.transpose(-1, -2) * dim**-0.5 + mask, dim=-1)  # [B, H, L, N]
    voters = inputs["cross_attention_mask"].flatten(2).any(-1) & inputs["attention_mask"].bool()  # [B, L]
    per_head = (probs * voters[:, None, :, None]).sum(2)  # [B, H, N]
    real = (inputs["aspect_ratio_mask"].bool() & (inputs["aspect_ratio_ids"] > 0)[..., None])
    real = real.repeat_interleave(PER_TILE, dim=-1).flatten(1)  # [B, N]
    kept = []
    for i in range(b):
        rows = real[i].nonzero()[:, 0].tolist()
        count = max(int(keep * len(rows)), 1)
        scores = per_head[i].sum(0, keepdim=True) if criterion == "sum" else per_head[i]
        chosen = set()
        for head_scores in scores:
            ranked = sorted(rows, key=lambda r: -float(head_scores[r]))
            chosen |= set(ranked[:count])
        kept.append(chosen)
    return kept


def slot_rows(cache, layer: int = 0) -> list[set[int]]:
    return [{r for r in row if r >= 0} for row in cache.cross[layer].rows.tolist()]


@pytest.mark.parametrize("base", [Full(), AVL(text_keep=0.5)], ids=repr)
def test_trim_keep_one_is_the_full_model_exactly(model, base):
    inputs = batch([prompt(3, 7, 31), prompt(6, 3, 32)], [[3], [6]], seed=31)
    ref_tokens, ref_logits, ref_cache = greedy(model, inputs, base)
    tokens, logits, cache = greedy(model, inputs, base, features=Trim(keep=1.0))
    assert tokens.tolist() == ref_tokens.tolist()
    assert torch.equal(logits, ref_logits)
    assert [c.k.shape for c in cache.cross] == [c.k.shape for c in ref_cache.cross]


@pytest.mark.parametrize("keep,criterion", [(0.5, "sum"), (0.3, "sum"), (0.25, "head_union")])
def test_trim_keeps_the_reference_rows_and_every_cross_layer_has_the_trimmed_length(hf_mllama, model, keep, criterion):
    inputs = batch([prompt(3, 8, 41), prompt(5, 4, 42), prompt(2, 9, 43)], [[6], [2], [7]], seed=41)
    expected = reference_kept_rows(hf_mllama[1], inputs, keep, criterion)
    _, logits, cache = greedy(model, inputs, steps=4, features=Trim(keep=keep, criterion=criterion))
    assert slot_rows(cache) == expected
    width = max(map(len, expected))
    n_real = [20, 10, 15]  # 4, 2 and 3 tiles of 5 feature rows
    if criterion == "sum":
        assert [len(s) for s in expected] == [int(keep * n) for n in n_real]
    assert len(cache.cross) == 2
    for layer, layer_cache in enumerate(cache.cross):
        assert layer_cache.k.shape == layer_cache.v.shape == (3, 2, width, 16)  # [B, Hkv, trimmed, D]
        assert slot_rows(cache, layer) == expected
        assert layer_cache.valid.sum(-1).tolist() == [len(s) for s in expected]
    assert torch.isfinite(logits).all()


def test_trim_halves_the_cross_attention_bytes_in_the_stats(model):
    inputs = batch([prompt(4, 6, 51)], [[6]], seed=51)
    _, _, full = greedy(model, inputs, Full(), steps=3)
    _, _, trimmed = greedy(model, inputs, AVL(text_keep=0.5, text_min_budget=2), steps=3,
                           features=Trim(keep=0.5, criterion="sum"))
    full_stats, trim_stats = full.stats(), trimmed.stats()
    assert [s.kind for s in full_stats.layers] == ["self"] * 3 + ["cross"] * 2
    cross_full, cross_trim = full_stats.total_of("cross"), trim_stats.total_of("cross")
    assert cross_full.stored_rows == 2 * 20 and cross_full.stored_bytes == 2 * 20 * 2 * 2 * 16 * 8
    assert cross_trim.stored_bytes * 2 == cross_full.stored_bytes
    assert cross_trim.full_bytes == cross_full.full_bytes
    assert trim_stats.total_of("self").stored_bytes < full_stats.total_of("self").stored_bytes  # text H2O evicts


# ---------------------------------------------------------------- batching

BATCH_POLICIES = [(Full(), None), (Full(), Trim(keep=0.5, criterion="sum")), (Full(), Trim(keep=0.4)),
                  (AVL(text_keep=0.5, text_min_budget=2), Trim(keep=0.5, criterion="sum")), (H2O(budget=0.5), None),
                  (StreamingLLM(sinks=2, window=4), None), (StreamingLLM(sinks=2, window=4, positions="original"), None)]


@pytest.mark.parametrize("policy,features", BATCH_POLICIES, ids=lambda p: repr(p)[:70])
def test_batch_with_different_prompt_lengths_and_tile_counts_equals_each_sample_alone(model, policy, features):
    prompts, ratios = [prompt(2, 4, 61), prompt(7, 9, 62), prompt(4, 2, 63)], [[1], [6], [3]]
    batched = batch(prompts, ratios, seed=61)
    tokens, logits, cache = greedy(model, batched, policy, steps=12, features=features)
    for i in range(3):
        alone = {k: v[i:i + 1, -len(prompts[i]):] if k in ("input_ids", "attention_mask", "cross_attention_mask")
                 else v[i:i + 1] for k, v in batched.items()}
        ref_tokens, ref_logits, ref_cache = greedy(model, alone, policy, steps=12, features=features)
        assert tokens[i].tolist() == ref_tokens[0].tolist()
        assert (logits[i] - ref_logits[0]).abs().max() <= 1e-8
        assert slot_rows(cache)[i] == slot_rows(ref_cache)[0]


@pytest.mark.parametrize("positions", ["shifted", "original"])
def test_streaming_llm_that_evicts_nothing_equals_the_full_cache(model, positions):
    """Nothing evicted: a row's index inside the cache is its position, so "shifted" rotates each key and
    query of the self-attention layers where the full cache does."""
    inputs = batch([prompt(2, 4, 71), prompt(7, 9, 72)], [[1], [6]], seed=71)
    tokens, logits, _ = greedy(model, inputs, Full(), steps=10)
    policy = StreamingLLM(sinks=2, window=64, positions=positions)
    streaming_tokens, streaming_logits, _ = greedy(model, inputs, policy, steps=10)
    assert streaming_tokens.tolist() == tokens.tolist()
    assert (streaming_logits - logits).abs().max() <= 1e-10


def test_generate_forwards_the_image_inputs_and_load_dispatches_on_model_type(hf_mllama, model):
    import inspect

    from avl.families import FAMILIES

    if "mllama" not in FAMILIES or not any(p.kind is p.VAR_KEYWORD
                                           for p in inspect.signature(avl.generate).parameters.values()):
        pytest.skip("avl.generate / avl.load do not know Llama-3.2-Vision yet (patches in the issue-5 report)")
    assert isinstance(avl.load(hf_mllama[0]), Mllama)
    policy, features = AVL(text_keep=0.5, text_min_budget=2), Trim(keep=0.5, criterion="sum")
    inputs = batch([prompt(2, 6, 91), prompt(5, 3, 92)], [[2], [6]], seed=91)
    ref_tokens, ref_logits, ref_cache = greedy(model, inputs, policy, steps=10, features=features)
    (ids, mask, pixels), rest = split(inputs)
    out = avl.generate(model, ids, pixel_values=pixels, attention_mask=mask, policy=policy, feature_policy=features,
                       max_new_tokens=10, output_logits=True, **rest)
    assert out.tokens.tolist() == ref_tokens.tolist()
    assert torch.equal(out.logits, ref_logits)
    assert out.stats.total_of("cross").stored_bytes == ref_cache.stats().total_of("cross").stored_bytes


# ---------------------------------------------------------------- compiled decode

@pytest.mark.slow
def test_compiled_decode_has_no_graph_breaks_and_matches_eager(model):
    from torch._dynamo.utils import counters

    from avl.generate import compile_decode

    policy, features = AVL(text_keep=0.5, text_min_budget=2), Trim(keep=0.5, criterion="sum")
    inputs = batch([prompt(2, 4, 71), prompt(6, 5, 72)], [[2], [6]], seed=71)
    eager_tokens, eager_logits, _ = greedy(model, inputs, policy, steps=16, features=features)
    torch._dynamo.reset()
    counters.clear()
    step = compile_decode(model)
    tokens, logits, _ = greedy(model, inputs, policy, steps=16, decode=step, features=features)
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1
    assert tokens.tolist() == eager_tokens.tolist()
    assert (logits - eager_logits).abs().max() <= 1e-5


# ---------------------------------------------------------------- bad input

def with_(inputs: dict, **changes) -> dict:
    return {**inputs, **changes}


@pytest.fixture
def one():
    return batch([prompt(3, 5, 81)], [[6]], seed=81)


def test_more_tiles_than_the_config_allows_fails_clearly(model, one):
    pixels = torch.cat([one["pixel_values"], one["pixel_values"][:, :, :1]], dim=2)  # 5 tiles
    with pytest.raises(ValueError, match="5 tiles per image.*max_num_tiles=4"):
        greedy(model, with_(one, pixel_values=pixels), steps=1)
    with pytest.raises(ValueError, match="aspect_ratio_ids holds \\[\\[9\\]\\]; allowed: 1..8"):
        greedy(model, with_(one, aspect_ratio_ids=torch.tensor([[9]])), steps=1)
    with pytest.raises(ValueError, match="aspect_ratio_mask marks \\[\\[3\\]\\] tiles"):
        greedy(model, with_(one, aspect_ratio_mask=torch.tensor([[[1, 1, 1, 0]]])), steps=1)


def test_more_images_than_image_tokens_fails_clearly(model):
    two = batch([prompt(3, 5, 82)], [[6, 1]], seed=82)  # one <|image|> token, two images
    with pytest.raises(ValueError, match=r"\[1\] <\|image\|> token\(s\) .* but \[2\] image\(s\)"):
        greedy(model, two, steps=1)
    ids = torch.tensor([prompt(3, 5, 82)])
    with pytest.raises(ValueError, match="no pixel_values"):
        greedy(model, dict(input_ids=ids, attention_mask=torch.ones_like(ids)), steps=1)


@pytest.mark.parametrize("shape", [(1, 9, 1, 4), (1, 10, 2, 4), (1, 10, 1, 3), (1, 10, 4)])
def test_cross_attention_mask_of_the_wrong_shape_fails_clearly(model, one, shape):
    assert one["input_ids"].shape == (1, 10)
    with pytest.raises(ValueError, match=r"cross_attention_mask has shape .* \[batch, length, images, tiles\]"):
        greedy(model, with_(one, cross_attention_mask=torch.ones(shape, dtype=torch.long)), steps=1)


def test_missing_image_inputs_fail_clearly(model, one):
    for name in ("aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask"):
        with pytest.raises(ValueError, match=f"{name} is required with pixel_values"):
            greedy(model, with_(one, **{name: None}), steps=1)


@pytest.mark.parametrize("policy,match", [
    (AVL(secondary=0.5), "selects image rows of the sequence"),
    (FastV(layer=1, keep=0.5), "drops image hidden states"),
    # the default layers lie beyond this model's 3 self-attention layers: the reason is still the image
    (FastV(), "needs image rows in the sequence"),
    (AVL(prefill_keep=0.5, prefill_layer=3), "needs image rows in the sequence"),
])
def test_policies_for_image_tokens_in_the_sequence_are_rejected(model, one, policy, match):
    with pytest.raises(ValueError, match=match):
        greedy(model, one, policy, steps=1)


def test_trim_on_a_model_without_cross_attention_fails_clearly(hf_llava):
    llava = avl.load(hf_llava[0])
    ids = torch.tensor([[1, *[300] * 16, 5, 6]])
    pixels = torch.randn(1, 3, 48, 48, dtype=torch.float64)
    with pytest.raises(ValueError, match="trims the image features of cross-attention layers, but this model has none"):
        llava.prefill(ids, torch.ones_like(ids), pixels, Full(), 4, feature_policy=Trim(keep=0.5))


def test_trim_on_a_text_model_without_cross_attention_layers_fails_clearly():
    from avl.models.mllama import MllamaTextConfig, MllamaTextModel

    text = MllamaTextModel(MllamaTextConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=1, cross_attention_layers=()))
    layout = PromptLayout.from_prompt(torch.zeros(1, 3, dtype=torch.bool), torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="cross_attention_layers is empty"):
        text.prefill(torch.randn(1, 3, 16), layout, Full(), 2, feature_policy=Trim(keep=0.5))
    text.prefill(torch.randn(1, 3, 16), layout, Full(), 2)  # the text policies still work


def test_config_is_parsed_from_both_rope_layouts():
    hub = {"text_config": {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
           "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
           "vision_config": {"image_size": 560}}
    cfg = MllamaConfig.from_dict(hub)
    assert cfg.text.rope_theta == 500000.0 and cfg.text.rope_scaling["factor"] == 8.0
    assert cfg.text.cross_attention_layers == (3, 8, 13, 18, 23, 28, 33, 38)
    assert cfg.vision.tokens_per_tile == 1601 and cfg.vision.padded_tokens_per_tile == 1608
    with pytest.raises(ValueError, match="text_config.cross_attention_layers"):
        MllamaConfig.from_dict({"text_config": {"num_hidden_layers": 4, "cross_attention_layers": [4]}})
    with pytest.raises(ValueError, match="vision_config.vision_output_dim"):
        MllamaConfig.from_dict({"vision_config": {"vision_output_dim": 100}})
