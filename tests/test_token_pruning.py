"""PyramidDrop through avl.generate on a tiny LLaVA: one stage is FastV; stages compound on N_img."""

from __future__ import annotations

import pytest
import torch

import avl
from avl.cache.token_pruning import PyramidDrop
from tiny_llava import left_pad, prompt_ids


@pytest.fixture(scope="module")
def model(hf_llava):
    return avl.load(hf_llava[0])


def pixels(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 48, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layer,keep", [(1, 0.5), (2, 0.25), (1, 0.75)])
def test_one_stage_gives_exactly_fastvs_tokens_and_logits(model, layer, keep):
    ids, mask = left_pad([prompt_ids(2, 5, 16, 0), prompt_ids(6, 3, 16, 1)])
    run = lambda policy: avl.generate(model, ids, pixel_values=pixels(2, 5), attention_mask=mask, policy=policy,
                                      max_new_tokens=10, output_logits=True)
    drop, fastv = run(PyramidDrop(layers=(layer,), keep=keep)), run(avl.FastV(layer=layer, keep=keep))
    full = run(avl.Full())
    assert drop.tokens.tolist() == fastv.tokens.tolist()
    assert torch.equal(drop.logits, fastv.logits)
    assert not torch.equal(drop.logits, full.logits)  # the drop did change the model


@pytest.mark.parametrize("keep,kept", [(0.5, (8, 4)), (0.8, (12, 10))])
def test_each_stage_keeps_int_of_the_original_image_count_times_keep_to_the_stage(model, keep, kept):
    # 16 image rows; at keep 0.8 stage 2 keeps int(16 * 0.64) = 10, where compounding the rounded count
    # of stage 1 would keep int(12 * 0.8) = 9
    prompt = prompt_ids(3, 6, 16, 4)
    out = avl.generate(model, torch.tensor([prompt]), pixel_values=pixels(1, 4), max_new_tokens=1,
                       policy=PyramidDrop(layers=(1, 2), keep=keep))
    rows = [s.stored_rows for s in out.stats.layers]  # the cache of each layer holds the rows that reached it
    assert rows == [len(prompt), len(prompt) - 16 + kept[0], len(prompt) - 16 + kept[1]]


def test_a_batch_with_left_padding_equals_each_prompt_alone(model):
    prompts = [prompt_ids(2, 4, 16, 0), prompt_ids(7, 9, 16, 1)]
    ids, mask = left_pad(prompts)
    policy = PyramidDrop(layers=(1, 2), keep=0.5)
    batched = avl.generate(model, ids, pixel_values=pixels(2, 7), attention_mask=mask, policy=policy,
                           max_new_tokens=8, output_logits=True)
    for i, prompt in enumerate(prompts):
        alone = avl.generate(model, torch.tensor([prompt]), pixel_values=pixels(2, 7)[i:i + 1], policy=policy,
                             max_new_tokens=8, output_logits=True)
        assert batched.tokens[i].tolist() == alone.tokens[0].tolist()
        assert (batched.logits[i] - alone.logits[0]).abs().max() <= 1e-8


@pytest.mark.parametrize("kwargs,match", [
    ({"layers": ()}, r"layers=\(\) is out of range"),
    ({"layers": (2, 2)}, r"layers=\(2, 2\)"),
    ({"layers": [8, 16]}, r"layers=\[8, 16\]"),
    ({"layers": (0, 4)}, r"layers=\(0, 4\)"),
    ({"layers": (True,)}, r"layers=\(True,\)"),
    ({"keep": 0.0}, r"keep=0.0 is out of range; allowed: a number in \(0, 1\]"),
    ({"keep": True}, r"keep=True"),
])
def test_bad_fields_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PyramidDrop(**kwargs)


def test_a_stage_past_the_last_layer_is_named(model):
    with pytest.raises(ValueError, match=r"layers=\(1, 3\) is out of range; allowed: stages in \[1, 2\]"):
        avl.generate(model, torch.tensor([prompt_ids(3, 6, 16, 4)]), pixel_values=pixels(1, 4), max_new_tokens=1,
                     policy=PyramidDrop(layers=(1, 3)))
