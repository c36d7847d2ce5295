"""generate(): batching with left padding, sampling controls, EOS, bad input, compiled decode."""

from __future__ import annotations

import pytest
import torch

import avl
from tiny_llava import POLICIES, left_pad, prompt_ids



@pytest.fixture(scope="module")
def model(hf_llava):
    return avl.load(hf_llava[0])


def pixels(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 48, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: repr(p)[:60])
def test_batch_with_left_padding_equals_each_prompt_alone(model, policy):
    prompts = [prompt_ids(2, 4, 16, 0), prompt_ids(7, 9, 16, 1), prompt_ids(4, 2, 16, 2)]
    images = pixels(3, 7)
    ids, mask = left_pad(prompts)
    batched = avl.generate(model, ids, pixel_values=images, attention_mask=mask, policy=policy,
                           max_new_tokens=12, output_logits=True)
    for i, prompt in enumerate(prompts):
        alone = avl.generate(model, torch.tensor([prompt]), pixel_values=images[i:i + 1], policy=policy,
                             max_new_tokens=12, output_logits=True)
        assert batched.tokens[i].tolist() == alone.tokens[0].tolist()
        assert (batched.logits[i] - alone.logits[0]).abs().max() <= 1e-8


def test_full_and_avl_with_every_ratio_one_equal_the_uncompressed_model(model):
    ids = torch.tensor([prompt_ids(3, 6, 16, 4)])
    full = avl.generate(model, ids, pixel_values=pixels(1, 4), max_new_tokens=10, output_logits=True)
    ones = avl.generate(model, ids, pixel_values=pixels(1, 4), max_new_tokens=10, output_logits=True,
                        policy=avl.AVL(secondary=1.0, core=1.0, refresh_every=2, prefill_keep=1.0, text_keep=1.0))
    assert ones.tokens.tolist() == full.tokens.tolist()
    assert (ones.logits - full.logits).abs().max() <= 1e-10


def test_eos_stops_a_sample_and_pads_the_rest(model):
    ids = torch.tensor([prompt_ids(3, 6, 16, 4)])
    free = avl.generate(model, ids, pixel_values=pixels(1, 4), max_new_tokens=10)
    eos = int(free.tokens[0, 3])
    stopped = avl.generate(model, ids, pixel_values=pixels(1, 4), max_new_tokens=10, eos_token_id=eos)
    first = free.tokens[0].tolist().index(eos)
    assert stopped.tokens[0].tolist() == free.tokens[0, : first + 1].tolist()


def test_sampling_is_reproducible_with_a_generator_and_top_p_tiny_is_greedy(model):
    ids = torch.tensor([prompt_ids(3, 6, 16, 4)])
    run = lambda **kw: avl.generate(model, ids, pixel_values=pixels(1, 4), max_new_tokens=8, do_sample=True,
                                    generator=torch.Generator().manual_seed(0), **kw).tokens
    assert run(temperature=0.7).tolist() == run(temperature=0.7).tolist()
    greedy = avl.generate(model, ids, pixel_values=pixels(1, 4), max_new_tokens=8).tokens
    assert run(top_p=1e-6).tolist() == greedy.tolist()


@pytest.mark.parametrize("kwargs,match", [
    ({"max_new_tokens": 0}, "max_new_tokens=0"),
    ({"temperature": 0.0}, "temperature=0.0"),
    ({"top_p": 1.5}, "top_p=1.5"),
    ({"attention_mask": torch.ones(1, 3, dtype=torch.long)}, "attention_mask"),
])
def test_bad_arguments_are_named(model, kwargs, match):
    ids = torch.tensor([prompt_ids(3, 6, 16, 4)])
    with pytest.raises(ValueError, match=match):
        avl.generate(model, ids, pixel_values=pixels(1, 4), **kwargs)


def test_right_padding_is_rejected(model):
    ids, mask = left_pad([prompt_ids(2, 4, 16, 0), prompt_ids(5, 4, 16, 1)])
    with pytest.raises(ValueError, match="left padding"):
        avl.generate(model, ids, pixel_values=pixels(2, 0), attention_mask=mask.flip(1))


@pytest.mark.parametrize("n_images", [0, 2])
def test_image_count_not_matching_the_image_tokens_fails_clearly(model, n_images):
    ids = torch.tensor([prompt_ids(3, 6, 16, 4)])
    images = pixels(n_images, 0) if n_images else None
    with pytest.raises(ValueError, match=f"16 image tokens .* {n_images} image"):
        avl.generate(model, ids, pixel_values=images)


@pytest.mark.slow
@pytest.mark.parametrize("policy,steps", [(avl.Full(), 32), (avl.AVL(0.45, 0.30, 3, 0.9, 0.5), 64),
                                          (avl.AdaKV(avl.SnapKV(0.5, window_size=4, kernel_size=3)), 32),
                                          (avl.StreamingLLM(sinks=2, window=8), 32)],
                         ids=["full", "avl", "adakv", "streaming-shifted"])
def test_compiled_decode_has_no_graph_breaks_and_compiles_once_per_variant(model, policy, steps):
    from torch._dynamo.utils import counters

    ids, mask = left_pad([prompt_ids(2, 4, 16, 0), prompt_ids(6, 5, 16, 1)])
    kwargs = dict(pixel_values=pixels(2, 3), attention_mask=mask, policy=policy, max_new_tokens=steps + 1,
                  output_logits=True)
    eager = avl.generate(model, ids, **kwargs)
    torch._dynamo.reset()
    counters.clear()
    compiled = avl.generate(model, ids, compile=True, **kwargs)
    assert dict(counters["graph_break"]) == {}
    # one graph for ordinary steps, one for refresh steps when the policy has them
    variants = 1 if policy.refresh_interval() is None else 2
    assert counters["stats"]["unique_graphs"] == variants
    assert compiled.tokens.tolist() == eager.tokens.tolist()
    # inductor evaluates the float32 rotary tables with its own cos/sin: ~1e-7 differences, far below
    # what a wrong index or mask would give
    assert (compiled.logits - eager.logits).abs().max() <= 1e-5


def test_timings_give_time_to_first_token_and_one_entry_per_decode_step(model):
    ids = torch.tensor([prompt_ids(3, 6, 16, 5)])
    out = avl.generate(model, ids, pixel_values=pixels(1, 5), max_new_tokens=6)
    assert out.timings.prefill_s > 0
    assert len(out.timings.step_s) == out.tokens.shape[1] - 1 == 5  # the first token comes from the prefill
    assert all(t > 0 for t in out.timings.step_s)
    assert out.stats.decode_steps == 5


def test_decoding_past_the_capacity_sized_at_prefill_raises(model):
    ids = torch.tensor([prompt_ids(3, 6, 16, 6)])
    for policy in (avl.Full(), avl.H2O(budget=0.5), avl.AVL(0.45, 0.30, 3, 0.9, 0.5)):
        logits, cache = model.prefill(ids, torch.ones_like(ids), pixels(1, 6), policy, 2)
        token = logits.argmax(-1)
        for _ in range(2):
            token = model.decode(token, cache).argmax(-1)
        with pytest.raises(ValueError, match="decode step 3 is past the capacity of this cache.*new_tokens=2"):
            model.decode(token, cache)


def test_prompt_plus_new_tokens_beyond_the_position_table_raises_naming_both(model):
    ids = torch.tensor([prompt_ids(3, 6, 16, 7)])
    limit = model.max_positions
    with pytest.raises(ValueError, match=rf"prompt length {ids.shape[1]} \+ max_new_tokens={limit} .* "
                                         rf"max_position_embeddings={limit}"):
        avl.generate(model, ids, pixel_values=pixels(1, 7), max_new_tokens=limit)


def test_stats_without_a_decode_step_show_what_the_prefill_attended(model):
    """The first token is the last one (max_new_tokens=1, or EOS at once): no decode step ran, and the
    'used' columns are the prefill's last row, which attended every prompt row."""
    ids = torch.tensor([prompt_ids(3, 6, 16, 8)])
    out = avl.generate(model, ids, pixel_values=pixels(1, 8), max_new_tokens=1)
    total = out.stats.total
    assert out.stats.decode_steps == 0
    assert total.used_rows == total.full_rows == len(model.language_model.layers) * ids.shape[1]
    assert "no decode step ran" in out.stats.table()
