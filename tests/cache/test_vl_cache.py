"""VL-Cache keeps what a naive implementation of the paper's rules keeps on transformers' own attentions.

The reference (`reference_keep`) reads transformers' `LlavaForConditionalGeneration` eager attention
probabilities (`output_attentions=True`, float64 model) and applies the rules of
`avl.cache.vl_cache` with plain loops: post-vision rows, column sums, thresholded sparsity, the
floored proportional budget, each head's top rows. The generation check masks exactly those rows
in transformers' decode attention and compares greedy tokens and logits.
"""

from __future__ import annotations

import pytest
import torch

import avl
from avl.cache.layout import PromptLayout
from avl.cache.policies import Policy
from avl.cache.registry import parse_policy
from avl.cache.vl_cache import VLCache
from tiny_llava import IMAGE_TOKEN, left_pad, prompt_ids

MASKED = "avl_test_vlcache_masked"  # transformers attention function of the masked reference


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(hf_llava):
    from transformers import LlavaForConditionalGeneration

    directory = hf_llava[0]
    eager = LlavaForConditionalGeneration.from_pretrained(directory, attn_implementation="eager",
                                                          dtype=torch.float64).eval()
    return directory, eager, avl.load(directory)


def pixels(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 48, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def reference_keep(attentions: tuple[torch.Tensor, ...], ids: list[int], keep: float, threshold: float,
                   kv_heads: int = 4) -> tuple[list[list[set[int]]], list[int]]:
    """The rows each layer and KV head keeps, and each layer's budget, from one prompt's attention
    probabilities (one [1, H, L, L] tensor per layer; query head h reads KV head h // (H / kv_heads)),
    computed entry by entry."""
    n = len(ids)
    post = [i for i in range(n) if i > max(j for j, t in enumerate(ids) if t == IMAGE_TOKEN)]
    densities, scores = [], []
    for probs in attentions:
        probs = probs[0]
        sparse = entries = 0
        layer_scores = []
        for h in range(probs.shape[0]):
            column = [0.0] * n
            for i in post:
                row = probs[h, i, :i + 1].tolist()
                top = max(row)
                sparse += sum(p < threshold * top for p in row)
                entries += len(row)
                for j, p in enumerate(row):
                    column[j] += p
            layer_scores.append(column)
        densities.append(1.0 - sparse / entries)
        group = len(layer_scores) // kv_heads
        scores.append([[sum(layer_scores[h][j] for h in range(g * group, (g + 1) * group)) for j in range(n)]
                       for g in range(kv_heads)])
    layers = len(attentions)
    budgets = [min(n, max(1, int(keep * n * layers * d / sum(densities)))) for d in densities]
    kept = [[set(sorted(range(n), key=lambda j: -head[j])[:budget]) for head in layer]
            for layer, budget in zip(scores, budgets)]
    return kept, budgets


def avl_kept(cache) -> list[list[set[int]]]:
    """Each layer's and head's kept prompt rows of sample 0 (every row is evictable: entry = token index)."""
    out = []
    for layer in cache.layers:
        entries = layer.order[0].masked_fill(~layer.live[0], -1)
        out.append([{int(e) for e in head if e >= 0} for head in entries])
    return out


@pytest.fixture(scope="module")
def gqa_models(tmp_path_factory):
    """A tiny float64 LLaVA with 2 KV heads for 4 query heads: transformers' eager model and avl's."""
    from transformers import LlavaForConditionalGeneration

    from tiny_llava import save_hf_llava

    directory = tmp_path_factory.mktemp("vlcache_gqa")
    save_hf_llava(directory, num_key_value_heads=2)
    eager = LlavaForConditionalGeneration.from_pretrained(directory, attn_implementation="eager",
                                                          dtype=torch.float64).eval()
    return directory, eager, avl.load(directory)


@pytest.mark.parametrize("kv_heads,keep,threshold", [(4, 0.4, 0.01), (4, 0.6, 0.01), (4, 0.3, 0.2), (2, 0.4, 0.01)])
def test_kept_rows_equal_the_naive_rules_on_transformers_attentions(request, kv_heads, keep, threshold):
    _, eager, model = request.getfixturevalue("models" if kv_heads == 4 else "gqa_models")
    ids, image = prompt_ids(3, 12, 16, 5), pixels(1, 5)
    with torch.no_grad():
        attentions = eager(input_ids=torch.tensor([ids]), pixel_values=image, output_attentions=True).attentions
        _, cache = model.prefill(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), image,
                                 VLCache(keep, threshold=threshold), 0)
    expected, budgets = reference_keep(attentions, ids, keep, threshold, kv_heads)
    assert len(set(budgets)) > 1  # the layers' sparsities differ, so their budgets do
    assert avl_kept(cache) == expected
    assert [s.stored_rows for s in cache.stats().layers] == budgets
    assert sum(budgets) <= keep * len(ids) * len(budgets)


def masked_attention(dropped: dict[int, torch.Tensor]):
    """transformers' eager attention of a decoder layer, causal in prefill, with `dropped[layer]`
    [H, L_prompt] (True = evicted) masked out of every decode step's keys."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    def forward(module, query, key, value, attention_mask, **kwargs):
        q_len, k_len = query.shape[2], key.shape[2]
        mask = torch.zeros(1, key.shape[1], q_len, k_len, dtype=query.dtype)
        mask += torch.full((q_len, k_len), float("-inf"), dtype=query.dtype).triu(k_len - q_len + 1)
        if q_len == 1:
            drop = dropped[module.layer_idx]
            mask[0, :, 0, :drop.shape[1]] = mask[0, :, 0, :drop.shape[1]].masked_fill(drop, float("-inf"))
        return eager_attention_forward(module, query, key, value, mask, **kwargs)

    return forward


def test_greedy_generation_equals_transformers_with_the_evicted_rows_masked(models):
    from transformers import AttentionInterface, LlavaForConditionalGeneration

    directory, eager, model = models
    ids, image, keep, steps = prompt_ids(4, 10, 16, 8), pixels(1, 8), 0.4, 8
    with torch.no_grad():
        attentions = eager(input_ids=torch.tensor([ids]), pixel_values=image, output_attentions=True).attentions
    kept, _ = reference_keep(attentions, ids, keep, 0.01)
    dropped = {layer: torch.tensor([[j not in head for j in range(len(ids))] for head in heads])
               for layer, heads in enumerate(kept)}
    AttentionInterface.register(MASKED, masked_attention(dropped))
    hf = LlavaForConditionalGeneration.from_pretrained(
        directory, attn_implementation={"text_config": MASKED, "vision_config": "eager", "": "eager"},
        dtype=torch.float64).eval()
    expected = hf.generate(input_ids=torch.tensor([ids]), pixel_values=image, max_new_tokens=steps, do_sample=False,
                           output_logits=True, return_dict_in_generate=True, pad_token_id=301, eos_token_id=None)
    out = avl.generate(model, torch.tensor([ids]), pixel_values=image, policy=VLCache(keep),
                       max_new_tokens=steps, output_logits=True)
    full = avl.generate(model, torch.tensor([ids]), pixel_values=image, max_new_tokens=steps)
    assert out.tokens[0].tolist() == expected.sequences[0, len(ids):].tolist()
    # transformers takes RMSNorm and softmax in float32 even in a float64 model: ~1e-6 (a wrong row: > 1e-3)
    assert (out.logits[0] - torch.stack(expected.logits, 1)[0]).abs().max() <= 1e-4
    assert out.tokens[0].tolist() != full.tokens[0].tolist()  # the eviction changed the generation
    stats = out.stats.layers
    assert all(s.stored_rows == len(heads[0]) + steps - 1 for s, heads in zip(stats, kept))  # decode evicts nothing


def test_a_left_padded_batch_generates_what_each_prompt_generates_alone(models):
    _, _, model = models
    prompts = [prompt_ids(2, 5, 16, 0), prompt_ids(7, 11, 16, 1), prompt_ids(0, 3, 16, 2)]
    images = pixels(3, 3)
    ids, mask = left_pad(prompts)
    policy = VLCache(0.4)
    batched = avl.generate(model, ids, pixel_values=images, attention_mask=mask, policy=policy, max_new_tokens=6,
                           output_logits=True)
    for i, prompt in enumerate(prompts):
        alone = avl.generate(model, torch.tensor([prompt]), pixel_values=images[i:i + 1], policy=policy,
                             max_new_tokens=6, output_logits=True)
        assert batched.tokens[i].tolist() == alone.tokens[0].tolist()
        assert (batched.logits[i] - alone.logits[0]).abs().max() <= 1e-8


def test_keep_one_keeps_every_row_and_equals_the_full_cache(models):
    _, _, model = models
    ids, image = torch.tensor([prompt_ids(3, 6, 16, 4)]), pixels(1, 4)
    full = avl.generate(model, ids, pixel_values=image, max_new_tokens=5, output_logits=True)
    out = avl.generate(model, ids, pixel_values=image, policy=VLCache(1.0), max_new_tokens=5, output_logits=True)
    assert torch.equal(out.logits, full.logits)
    assert [s.stored_rows for s in out.stats.layers] == [s.full_rows for s in out.stats.layers]


def test_a_prompt_ending_with_its_image_is_named():
    image = torch.zeros(1, 6, dtype=torch.bool)
    image[0, 2:] = True
    layout = PromptLayout.from_prompt(image, torch.ones(1, 6, dtype=torch.long))
    q, k = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4)
    with pytest.raises(ValueError, match="sample 0 has no prompt row after its last image"):
        VLCache(0.5).layer_scores(0, q, k, layout, 0.5)


@pytest.mark.parametrize("kwargs,match", [
    ({"keep": 0}, r"keep=0 is out of range; allowed: a number in \(0, 1\]"),
    ({"keep": 1.5}, r"keep=1.5 is out of range"),
    ({"keep": True}, r"keep=True is out of range"),
    ({"threshold": 0.0}, r"threshold=0.0 is out of range; allowed: a number in \(0, 1\)"),
    ({"threshold": 1}, r"threshold=1 is out of range"),
    ({"threshold": False}, r"threshold=False is out of range"),
])
def test_bad_fields_are_named_with_the_allowed_range(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VLCache(**kwargs)


def test_it_is_registered_for_the_command_line_eval_and_sweeps():
    from avl.cli import build_parser
    from avl.cli_policies import policy_from_args
    from avl.eval.sweep import parse_grid

    assert isinstance(VLCache(), Policy) and avl.VLCache is VLCache
    assert parse_policy("vlcache(keep=0.1;threshold=0.02)") == VLCache(0.1, 0.02)
    args = build_parser().parse_args(["generate", "--model", "m", "--image", "i", "--prompt", "p", "--policy",
                                      "vlcache", "--vlcache-keep", "0.2"])
    assert policy_from_args(args) == VLCache(keep=0.2)
    assert parse_grid("vlcache: keep=0.1,0.5")[0] == [VLCache(0.1), VLCache(0.5)]
