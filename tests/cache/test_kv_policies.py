"""Fields, errors and whole-cache cases of the kvpress-pinned policies (parity: test_kvpress_parity.py)."""

from __future__ import annotations

import pytest
import torch

from avl.cache.kv_policies import AdaKV, KNorm, ObservedAttention, PyramidKV, RandomEviction, SnapKV
from avl.cache.policies import Policy


@pytest.mark.parametrize("make,match", [
    (lambda: SnapKV(keep=0), r"keep=0 is out of range; allowed: a number in \(0, 1\]"),
    (lambda: SnapKV(keep=1.5), r"keep=1.5 is out of range"),
    (lambda: KNorm(keep=True), r"keep=True is out of range"),
    (lambda: SnapKV(window_size=0), r"window_size=0 is out of range; allowed: an integer >= 1"),
    (lambda: SnapKV(window_size=True), r"window_size=True"),
    (lambda: SnapKV(kernel_size=4), r"kernel_size=4 is out of range; allowed: an odd integer >= 1"),
    (lambda: PyramidKV(beta=0), r"beta=0 is out of range; allowed: an integer >= 1"),
    (lambda: PyramidKV(beta=2.5), r"beta=2.5"),
    (lambda: RandomEviction(seed=-1), r"seed=-1 is out of range; allowed: an integer >= 0"),
    (lambda: RandomEviction(seed=False), r"seed=False"),
    (lambda: AdaKV(alpha_safeguard=1.2), r"alpha_safeguard=1.2 is out of range; allowed: a number in \[0, 1\]"),
    (lambda: AdaKV(alpha_safeguard=True), r"alpha_safeguard=True"),
    (lambda: AdaKV(ObservedAttention()), r"scorer=ObservedAttention.* allowed: SnapKV, KNorm or RandomEviction"),
    (lambda: AdaKV(PyramidKV()), r"scorer=PyramidKV"),
])
def test_bad_fields_are_named_with_the_allowed_range(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_they_are_policies_and_adakv_keeps_its_scorers_share():
    assert all(isinstance(p, Policy) for p in (SnapKV(), PyramidKV(), AdaKV(), KNorm(), ObservedAttention(),
                                               RandomEviction()))
    assert AdaKV(KNorm(keep=0.3)).keep == 0.3


def inputs(batch: int = 1, length: int = 20, heads: int = 4, kv_heads: int = 2, dim: int = 8):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, length, dim, generator=g, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, length, dim, generator=g, dtype=torch.float64)
    return q, k, torch.ones(batch, length, dtype=torch.bool)


@pytest.mark.parametrize("policy", [SnapKV(1.0, window_size=64), PyramidKV(1.0), AdaKV(KNorm(1.0)), KNorm(1.0),
                                    ObservedAttention(1.0), RandomEviction(1.0)], ids=repr)
def test_keep_one_keeps_every_prompt_row_without_scoring(policy):
    q, k, valid = inputs()
    valid[0, :3] = False  # left padding stays out
    got = policy.prompt_keep(0, 2, q, k, valid, 8 ** -0.5)  # a 20-row prompt is shorter than SnapKV's window
    assert torch.equal(got, valid[:, None].expand(-1, 2, -1))


def test_snapkv_names_a_prompt_not_longer_than_its_window():
    q, k, valid = inputs(length=20)
    with pytest.raises(ValueError, match="sample 0 has 20 prompt rows; SnapKV needs more than window_size=20"):
        SnapKV(0.5, window_size=20).prompt_keep(0, 2, q, k, valid, 8 ** -0.5)


def test_right_padding_is_rejected():
    q, k, valid = inputs()
    valid[0, -2:] = False
    with pytest.raises(ValueError, match="valid is not left padding"):
        KNorm(0.5).prompt_keep(0, 2, q, k, valid, 8 ** -0.5)


def test_adakv_keeps_the_scorers_total_with_per_head_counts_and_each_heads_safeguard():
    q, k, valid = inputs(length=40)
    k[:, 0] *= 3  # head 0's keys have the large norms, so KNorm's global ranking favours head 1
    keep = AdaKV(KNorm(0.5), alpha_safeguard=0.25).prompt_keep(0, 2, q, k, valid, 8 ** -0.5)
    counts = keep.sum(-1)[0]
    assert int(counts.sum()) == 2 * 20 and counts[0] < counts[1]
    assert int(counts[0]) >= int(20 * 0.25)
    norms = k[0].norm(dim=-1)  # each head's own safeguarded rows are its lowest-norm ones
    assert keep[0, 0, norms[0].argsort()[:5]].all()


def test_mismatched_queries_and_keys_are_named():
    q, k, valid = inputs(length=80)
    with pytest.raises(ValueError, match=r"q \(1, 4, 79, 8\) and k \(1, 2, 80, 8\) do not match"):
        SnapKV(0.5).prompt_keep(0, 2, q[:, :, 1:], k, valid, 8 ** -0.5)
    with pytest.raises(ValueError, match=r"valid has shape \(1, 79\); allowed: \[B, L\] = \[1, 80\]"):
        KNorm(0.5).prompt_keep(0, 2, q, k, valid[:, 1:], 8 ** -0.5)


def naive_step(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], scale: float) -> torch.Tensor:
    """Dense attention of q [Hq, D] over each KV head's own rows keys[h] / values[h] [n_h, D]."""
    groups = q.shape[0] // len(keys)
    out = [torch.softmax(q[h] @ keys[h // groups].T * scale, -1) @ values[h // groups] for h in range(q.shape[0])]
    return torch.stack(out)


@pytest.mark.parametrize("policy", [AdaKV(KNorm(0.5), alpha_safeguard=0.0), PyramidKV(0.4, window_size=4, beta=2),
                                    SnapKV(0.3, window_size=4, kernel_size=3)], ids=repr)
def test_the_cache_holds_and_attends_exactly_each_heads_kept_rows(policy):
    """build_layer_cache + LayerCache.step against a naive per-head decode over the kept rows plus
    the generated ones: outputs, stored rows (the stats) and the rows each step attends."""
    from avl.cache.layout import Modality, PromptLayout
    from avl.cache.modal_cache import ModalCache
    from avl.cache.policies import build_layer_cache

    batch, heads, kv_heads, length, dim, steps, scale = 2, 4, 2, 40, 8, 5, 8 ** -0.5
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(batch, h, length, dim, generator=g, dtype=torch.float64)
               for h in (heads, kv_heads, kv_heads))
    k[:, 0] *= 3  # AdaKV then gives the heads different counts
    valid = torch.ones(batch, length, dtype=torch.bool)
    valid[1, :9] = False  # left padding: sample 1 has 31 rows
    layout = PromptLayout(torch.where(valid, Modality.TEXT, Modality.PAD), (valid.cumsum(-1) - 1).clamp(min=0))
    layers, masks = [], []
    for layer in range(2):
        mask = policy.prompt_keep(layer, 2, q, k, valid, scale)
        masks.append(mask)
        layers.append(build_layer_cache(policy, layout, k, v, layout.count(Modality.IMAGE), None, None, steps, mask))
    cache = ModalCache(layers, policy, layout.positions[:, -1] + 1, valid.sum(-1), steps)
    counts = torch.stack(masks).sum(-1)  # [layers, B, Hkv]
    if isinstance(policy, AdaKV):
        assert (counts[:, 0, 0] != counts[:, 0, 1]).all()  # per-head counts differ
    if isinstance(policy, PyramidKV):
        assert (counts[0] > counts[1]).all()  # the pyramid: the first layer keeps more
    for layer, cache_layer, mask in zip(range(2), layers, masks):
        assert cache_layer.stored_head_rows() == int(mask.sum())
        assert cache_layer.live.shape[2] == int(counts[layer].max()) + steps + 1  # sized at the largest head
    kept_k = [[[k[b, h, mask[b, h]] for h in range(kv_heads)] for b in range(batch)] for mask in masks]
    kept_v = [[[v[b, h, mask[b, h]] for h in range(kv_heads)] for b in range(batch)] for mask in masks]
    for t in range(1, steps + 1):
        plan = cache.next_step()
        q_new, k_new, v_new = (torch.randn(batch, h, 1, dim, generator=g, dtype=torch.float64)
                               for h in (heads, kv_heads, kv_heads))
        for layer, cache_layer in enumerate(layers):
            out = cache_layer.step(q_new, k_new, v_new, scale, plan.refresh, plan.widths[layer])
            assert plan.widths[layer] == int(counts[layer].max()) + t  # the largest head's rows, no more
            for b in range(batch):
                for h in range(kv_heads):
                    kept_k[layer][b][h] = torch.cat([kept_k[layer][b][h], k_new[b, h]])
                    kept_v[layer][b][h] = torch.cat([kept_v[layer][b][h], v_new[b, h]])
                expected = naive_step(q_new[b, :, 0], kept_k[layer][b], kept_v[layer][b], scale)
                torch.testing.assert_close(out[b, :, 0], expected, rtol=0, atol=1e-12)
            assert int(cache_layer.used) == int(counts[layer].sum()) + t * batch * kv_heads  # attended head-rows
            assert cache_layer.stored_head_rows() == int(counts[layer].sum()) + t * batch * kv_heads
    stats = cache.stats()
    per_row = 2 * dim * k.element_size()
    for layer, s in enumerate(stats.layers):
        assert s.stored_bytes == s.used_bytes == (int(counts[layer].sum()) + steps * batch * kv_heads) * per_row


def test_generate_names_a_prompt_not_longer_than_snapkvs_window(hf_llava):
    """kvpress asserts on such a prompt; avl refuses it with the numbers (no silent fallback)."""
    import avl
    from tiny_llava import prompt_ids

    model = avl.load(hf_llava[0])
    ids = torch.tensor([prompt_ids(2, 4, 16, 0)])  # 23 rows
    pixels = torch.zeros(1, 3, 48, 48, dtype=torch.float64)
    with pytest.raises(ValueError, match="sample 0 has 23 prompt rows; SnapKV needs more than window_size=64"):
        avl.generate(model, ids, pixel_values=pixels, policy=SnapKV(0.5), max_new_tokens=2)
