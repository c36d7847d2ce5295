"""Hypothesis properties of ModalCache under every policy: counts, subsets, ranges, budgets, bytes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import avl
from avl.cache.layout import Modality, PromptLayout
import copy

from avl.cache.modal_cache import DecodePlan, keep_heavy_and_recent
from avl.cache.policies import build_layer_cache
from avl.ops import gathered_attention

HEADS, DIM = 2, 4


@st.composite
def prompts(draw):
    """A left-padded batch: per sample pads, system, image and text lengths."""
    batch = draw(st.integers(1, 3))
    n_image = draw(st.integers(4, 24))  # one image size per batch, as in LLaVA-1.5
    rows = [(draw(st.integers(0, 4)), draw(st.integers(0, 5)), draw(st.integers(1, 12))) for _ in range(batch)]
    width = max(s + n_image + t for _, s, t in rows)
    image = torch.zeros(batch, width, dtype=torch.bool)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for b, (_, s, t) in enumerate(rows):
        start = width - (s + n_image + t)
        mask[b, start:] = 1
        image[b, start + s:start + s + n_image] = True
    return PromptLayout.from_prompt(image, mask)


ratios = st.sampled_from([None, 0.25, 0.5, 0.9, 1.0])


def rows_of(x, slots):
    """The rows [H, D] of x [H, N, D] at `slots`, as a sorted list of tuples (a set of rows, any order)."""
    return sorted(tuple(x[:, slot].flatten().tolist()) for slot in slots)


@st.composite
def policies(draw):
    kind = draw(st.sampled_from(["full", "avl", "h2o", "streaming"]))
    if kind == "full":
        return avl.Full()
    if kind == "h2o":
        return avl.H2O(budget=draw(st.sampled_from([0.3, 0.5, 1.0])), heavy_share=draw(st.sampled_from([0.0, 0.25, 0.5])))
    if kind == "streaming":
        return avl.StreamingLLM(sinks=draw(st.integers(0, 3)), window=draw(st.integers(1, 8)),
                                positions=draw(st.sampled_from(["shifted", "original"])))
    secondary = draw(ratios)
    core = draw(st.sampled_from([None, 0.1, 0.25])) if secondary is not None else None
    core = min(core, secondary) if core is not None else None
    return avl.AVL(secondary=secondary, core=core, refresh_every=draw(st.integers(1, 3)) if core else None,
                   text_keep=draw(ratios), text_min_budget=draw(st.integers(1, 4)))


@settings(max_examples=60, deadline=None)
@given(layout=prompts(), policy=policies(), steps=st.integers(0, 6), seed=st.integers(0, 2**16))
def test_cache_invariants_through_prefill_and_decode(layout, policy, steps, seed):
    g = torch.Generator().manual_seed(seed)
    b, length = layout.modality.shape
    k = torch.randn(b, HEADS, length, DIM, generator=g)
    v = torch.randn(b, HEADS, length, DIM, generator=g)
    image_scores = torch.rand(b, length, generator=g)
    evict_scores = torch.rand(b, HEADS, length, generator=g)
    n_image = layout.count(Modality.IMAGE)
    cache = build_layer_cache(policy, layout, k, v, n_image, image_scores, evict_scores, new_tokens=steps + 1)

    for s in range(b):
        tokens = torch.nonzero(layout.modality[s] == Modality.SYSTEM).flatten().tolist()
        system_slots = cache.system[s][cache.system[s] >= 0].tolist()
        if not isinstance(policy, (avl.H2O, avl.StreamingLLM)):
            # system rows are never evicted, and they are exactly the rows before the image
            assert torch.equal(k[s, :, tokens], cache.k[s, :, system_slots])
        assert set(cache.core[s][cache.core[s] >= 0].tolist()) <= set(cache.vision[s][cache.vision[s] >= 0].tolist())
        image_rows = torch.nonzero(layout.modality[s] == Modality.IMAGE).flatten().tolist()
        if not isinstance(policy, (avl.H2O, avl.StreamingLLM)):  # the core: the top image rows by the score, first
            top = sorted(image_rows, key=lambda r: (-float(image_scores[s, r]), r))[:int(cache.core_count[s])]
            core_slots = cache.core[s][cache.core[s] >= 0].tolist()
            assert rows_of(cache.k[s], core_slots) == rows_of(k[s], top)
            assert core_slots == cache.vision[s][:len(core_slots)].tolist()
        counts = policy.image_counts(n_image)
        kept = int((cache.vision[s] >= 0).sum())
        if counts is None:
            assert kept == int(n_image[s]) or isinstance(policy, (avl.H2O, avl.StreamingLLM))
        else:
            assert kept == min(int(counts[0][s]), int(n_image[s]))
            assert int((cache.core[s] >= 0).sum()) == min(int(counts[1][s]), kept)

    budget = policy.eviction()
    core_counts = policy.image_counts(n_image)
    if core_counts is not None:  # the core index is as wide as the batch's largest core count, no wider
        assert cache.core.shape[1] == int(torch.minimum(core_counts[1], n_image).max())
    plan = DecodePlan([cache], budget, steps, policy.refresh_interval())
    available = cache.seen[:, None].expand(-1, HEADS)  # rows that could be live: all seen, at prefill
    for step in range(steps + 1):
        live = cache.live.sum(-1)  # [B, Hkv]
        # the budget is met exactly, unless fewer rows are available (evicted rows never come back)
        expected = torch.minimum(budget.rows(cache.seen)[:, None], available) if budget.evicts else available
        assert torch.equal(live, expected)
        pinned_bytes = 0 if cache.pinned_k is None else cache.pinned_k.numel() * cache.pinned_k.element_size()
        assert cache.allocated_bytes() == 2 * cache.k.numel() * cache.k.element_size() + pinned_bytes
        if step == steps:
            with pytest.raises(ValueError, match="past the capacity"):
                plan.next()
            break
        q = torch.randn(b, HEADS, 1, DIM, generator=g)
        k_new, v_new = torch.randn(2, b, HEADS, 1, DIM, generator=g)
        planned = plan.next()
        width = planned.widths[0]
        assert planned.refresh == (policy.refresh_interval() is not None and (step + 1) % policy.refresh_interval() == 0)
        # the reference: append, attend every selected row, then H2O recomputed over all live rows
        ref = copy.deepcopy(cache)
        ref.append(k_new, v_new, ref.live.shape[2])
        # the slots of the rows the step attends, in cache order: pinned rows, then live evictable rows by entry
        cache_rows = [[[int(x) for x in ref.system[s] if x >= 0]
                       + [ref.evictable_start + j for j in sorted(torch.nonzero(ref.live[s, h]).flatten().tolist(),
                                                                  key=lambda j: int(ref.order[s, h, j]))]
                       for h in range(HEADS)] for s in range(b)]
        # the step's width is the largest live count of the batch right after the append: nothing beyond
        assert width == int(ref.live.sum(-1).max()) and ref.occupied_width() <= width
        idx = ref.indices(planned.refresh, ref.live.shape[2])
        _, ref_probs = gathered_attention(q, ref.k, ref.v, idx, DIM**-0.5)
        if budget.evicts:
            ref.score.add_(ref_probs[:, :, idx.shape[2] - ref.live.shape[2]:])
            ref.live.copy_(keep_heavy_and_recent(ref.live, ref.order, ref.score, *budget.counts(ref.seen)))

        calls = []

        def rotate(x, positions, query):  # records what the cache asks; identity, so `out` is comparable
            calls.append((query, x.shape[2], positions.clone()))
            return x

        n_pinned_valid = (torch.cat([cache.system, cache.vision], dim=1) >= 0).sum(-1)  # [B]
        seen_before = cache.seen.clone()
        out = cache.step(q, k_new, v_new, DIM**-0.5, planned.refresh, width, rotate if cache.shifted else None)
        if cache.shifted:  # pos_shift: row i of [pinned rows | live evictable rows by entry] is at position i
            # keys stay where they were rotated: prompt rows at their prompt positions (pinned rows, then
            # evictable rows by entry: checked at the build), the new key at its entry position; the
            # query and the pinned rows are rotated on top so that the position differences are pos_shift's
            n_pinned = cache.pinned_k.shape[2]
            assert [(c[0], c[1]) for c in calls] == [(False, 1), (True, 1), (False, 1)] + [(False, n_pinned)] * (n_pinned > 0)
            (_, _, new_pos), (_, _, query_pos), (_, _, query_turn) = calls[:3]
            pinned_turn = calls[3][2] if n_pinned else None
            for s in range(b):
                for h in range(HEADS):
                    assert int(new_pos[s, h, 0]) == int(n_pinned_valid[s] + seen_before[s])
                    rows = cache_rows[s][h]
                    entry = {cache.evictable_start + j: int(ref.order[s, h, j]) for j in range(ref.live.shape[2])}
                    key_pos = [slot + int(pinned_turn[s, h, slot]) if slot < n_pinned  # pinned slot j: row j
                               else int(n_pinned_valid[s]) + entry[slot] for slot in rows]
                    query = int(query_pos[s, h, 0]) + int(query_turn[s, h, 0])
                    assert [query - p for p in key_pos] == list(range(len(rows) - 1, -1, -1))
                    assert int(query_pos[s, h, 0]) == len(rows) - 1  # the query-only factor: at the cache length
        else:
            assert calls == []
        assert int(cache.used) == int((idx >= 0).sum())  # the rows attended, counted over heads
        assert torch.equal(cache.live, ref.live)
        assert torch.isfinite(out).all()
        n_system, n_vision = cache.system.shape[1], cache.vision.shape[1]
        vision = slice(n_system, n_system + n_vision)
        for x, x_ref in ((cache.k, ref.k), (cache.v, ref.v)):
            assert torch.equal(x[:, :, :n_system], x_ref[:, :, :n_system])
            assert torch.equal(x[:, :, vision.stop:], x_ref[:, :, vision.stop:])
        if not planned.refresh:
            assert torch.equal(cache.k[:, :, vision], ref.k[:, :, vision])
        for s in range(b):  # a refresh re-ranks the core by this step's head-mean image probabilities
            held = [j for j in range(n_vision) if int(ref.vision[s, j]) >= 0]
            image_probs = ref_probs[s, :, n_system:n_system + n_vision].mean(0).tolist()
            ranked = sorted(held, key=lambda j: (-image_probs[j], j)) if planned.refresh else held
            expected = ranked[:int(cache.core_count[s])]
            core_slots = cache.core[s][cache.core[s] >= 0].tolist()
            assert core_slots == [int(cache.vision[s, j]) for j in range(len(expected))]  # the first vision slots
            assert rows_of(cache.k[s], core_slots) == rows_of(ref.k[s], [int(ref.vision[s, j]) for j in expected])
            assert rows_of(cache.k[s], cache.vision[s][cache.vision[s] >= 0].tolist()) == \
                rows_of(ref.k[s], ref.vision[s][ref.vision[s] >= 0].tolist())  # the secondary rows, moved not changed
        available = live + 1
        assert set(cache.core[0][cache.core[0] >= 0].tolist()) <= set(cache.vision[0][cache.vision[0] >= 0].tolist())


def test_capacity_does_not_enter_the_attended_width():
    """A cache sized for 4096 new tokens attends exactly what one sized for 8 does, step by step."""
    layout = PromptLayout.from_prompt(torch.tensor([[False, True, True, True, False, False]]),
                                      torch.ones(1, 6, dtype=torch.long))
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 1, HEADS, 6, DIM, generator=g)
    scores = torch.rand(1, 6, generator=g), torch.rand(1, HEADS, 6, generator=g)
    for policy in (avl.Full(), avl.H2O(budget=0.5), avl.AVL(secondary=0.7, core=0.4, refresh_every=2, text_keep=0.5)):
        small = build_layer_cache(policy, layout, k, v, layout.count(Modality.IMAGE), *scores, new_tokens=8)
        large = build_layer_cache(policy, layout, k, v, layout.count(Modality.IMAGE), *scores, new_tokens=4096)
        assert large.live.shape[2] > 100 * small.live.shape[2] or not policy.eviction().evicts
        plans = [DecodePlan([c], policy.eviction(), n, policy.refresh_interval()) for c, n in ((small, 8), (large, 4096))]
        for _ in range(8):
            q, k_new, v_new = torch.randn(3, 1, HEADS, 1, DIM, generator=g)
            steps = [p.next() for p in plans]
            assert steps[0] == steps[1]
            outs = [c.step(q, k_new, v_new, DIM**-0.5, s.refresh, s.widths[0]) for c, s in zip((small, large), steps)]
            assert torch.equal(outs[0], outs[1]) and int(small.used) == int(large.used)


@settings(max_examples=40, deadline=None)
@given(value=st.floats(-2, 3, allow_nan=False) | st.none())
def test_ratio_validation_names_the_field(value):
    ok = value is None or 0 < value <= 1
    try:
        avl.AVL(text_keep=value)
    except ValueError as error:
        assert not ok and "text_keep" in str(error) and "(0, 1]" in str(error)
    else:
        assert ok


def test_policy_field_errors():
    with pytest.raises(ValueError, match="core=0.5 exceeds secondary=0.25"):
        avl.AVL(secondary=0.25, core=0.5, refresh_every=2)
    with pytest.raises(ValueError, match="refresh_every=0"):
        avl.AVL(secondary=0.5, core=0.25, refresh_every=0)
    with pytest.raises(ValueError, match="core is set"):
        avl.AVL(secondary=0.5, core=0.25)
    with pytest.raises(ValueError, match="refresh_every is set but core is None"):
        avl.AVL(secondary=0.5, refresh_every=2)
    with pytest.raises(ValueError, match="keep=0"):
        avl.FastV(keep=0)
    with pytest.raises(ValueError, match="window=0"):
        avl.StreamingLLM(window=0)
    with pytest.raises(ValueError, match="prefill_layer=9 is out of range; allowed: \\[1, 3\\]"):
        avl.AVL(prefill_keep=0.5, prefill_layer=9).check_layers(4)
