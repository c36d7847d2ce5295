"""The A-VL release's flags -> AVL fields (issue 11, item 14), and FastV's keep vs R (item 13).

The expected fields are the fixture README's table (S, C, K, P, T of each run), written out by hand;
the flags are those of the fixture's expected.json, as the authors ran them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import avl
from avl.cache.release_flags import RELEASE_FLAGS, release_policy
from tiny_llava import FIXTURES

README = Path(__file__).resolve().parents[2] / "README.md"
RUNS = json.loads((FIXTURES / "avl-reference" / "llava-tiny-seed0" / "expected.json").read_text())["runs"]

# run -> AVL fields (fixture README: "Runs, in the paper's parameters"); unlisted fields keep AVL's defaults
EXPECTED = {
    "full": {},
    "vision_S50": {"secondary": 0.50},
    "vision_S45_C30_K3": {"secondary": 0.45, "core": 0.30, "refresh_every": 3},
    "vision_S40_C20_K2_P80": {"secondary": 0.40, "core": 0.20, "refresh_every": 2, "prefill_keep": 0.80,
                              "prefill_layer": 2},
    "avl_S45_C30_K3_P90_T50": {"secondary": 0.45, "core": 0.30, "refresh_every": 3, "prefill_keep": 0.90,
                               "prefill_layer": 2, "text_keep": 0.50, "text_heavy_share": 0.5, "text_min_budget": 4},
    "text_T50": {"text_keep": 0.50, "text_heavy_share": 0.5, "text_min_budget": 4},
    "fastv_K2_R50": {"prefill_keep": 0.50, "prefill_layer": 2},
}
AVL_DEFAULTS = {"secondary": None, "core": None, "refresh_every": None, "prefill_keep": None, "text_keep": None,
                "prefill_layer": 2, "text_heavy_share": 0.5, "text_min_budget": 4}


def fields(policy: avl.AVL) -> dict:
    return {name: getattr(policy, name) for name in AVL_DEFAULTS}


def test_every_fixture_run_is_covered():
    assert set(RUNS) == set(EXPECTED) | {"h2o_50"}


@pytest.mark.parametrize("run", sorted(EXPECTED))
def test_from_release_flags_gives_each_fixture_runs_fields(run):
    policy = avl.AVL.from_release_flags(**RUNS[run]["settings"])
    assert fields(policy) == pytest.approx(AVL_DEFAULTS | EXPECTED[run], abs=1e-12)


def test_the_h2o_baseline_is_not_an_avl_policy():
    with pytest.raises(ValueError, match="all_use_h2o=true is the H2O baseline, not an AVL policy"):
        avl.AVL.from_release_flags(**RUNS["h2o_50"]["settings"])
    assert release_policy(RUNS["h2o_50"]["settings"]) == avl.H2O(budget=0.5, heavy_share=0.25)
    assert release_policy(RUNS["fastv_K2_R50"]["settings"]) == avl.FastV(layer=2, keep=0.5)
    assert release_policy({}) == avl.Full()


def test_absent_flags_take_the_release_command_line_defaults():
    """Runs that followed the release README got these, not AVL's defaults (2, 0.5, 4)."""
    assert avl.AVL.from_release_flags(prefill_filter_flag=True).prefill_layer == 3
    text = avl.AVL.from_release_flags(text_pruning_flag="true")
    assert (text.text_keep, text.text_heavy_share, text.text_min_budget) == (0.5, 0.7, 20)
    vision = avl.AVL.from_release_flags(vision_adaptive_attention="true")
    assert (vision.secondary, vision.core, vision.refresh_every) == (0.5, None, None)  # interval -1: no split
    assert avl.AVL.from_release_flags(prefill_filter_flag=True).prefill_keep == 0.5


def test_counts_follow_the_release_arithmetic():
    """The release keeps int((1 - rate) * N): 1 - 0.9 is 0.09999999999999998 in floating point, so of
    10 image tokens it keeps 0, and so must we (a rounded 0.1 would keep 1)."""
    policy = avl.AVL.from_release_flags(vision_adaptive_attention=True, vision_adaptive_attention_rate=0.9)
    secondary, core = policy.image_counts(torch.tensor([10, 576]))
    assert secondary.tolist() == [0, 57] and core.tolist() == [0, 57]


@pytest.mark.parametrize("flags,match", [
    ({"vision_adaptive_attention_ratio": 0.5}, r"unknown release flag\(s\) \['vision_adaptive_attention_ratio'\]"),
    ({"vision_adaptive_attention": "yes"}, r"vision_adaptive_attention='yes' is invalid; allowed: True / False"),
    ({"prefill_filter_flag": True, "prefill_filter_rate": 1.0}, r"prefill_filter_rate=1.0 is out of range"),
    ({"prefill_filter_flag": True, "prefill_filter_layer": 2.0}, r"prefill_filter_layer=2.0 is a float; allowed: "
                                                                 r"an integer"),
    ({"text_pruning_flag": True, "text_use_h2o": False}, r"text rule of the release that avl does not implement"),
    ({"all_use_h2o": True, "text_pruning_flag": True}, r"mixes the H2O baseline with A-VL parts"),
])
def test_bad_release_flags_are_named(flags, match):
    with pytest.raises(ValueError, match=match):
        avl.AVL.from_release_flags(**flags)


def test_the_readme_table_lists_every_flag_with_its_default_and_field():
    rows = {}
    for line in README.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.fullmatch(r"`[a-z0-9_]+`", cells[0]):
            rows[cells[0].strip("`")] = (cells[1].strip("`"), cells[2].strip("`"))
    shown = {f.name: (str(f.default).lower() if isinstance(f.default, bool) else str(f.default), f.field or "-")
             for f in RELEASE_FLAGS}
    assert rows == shown
    assert rows["prefill_filter_layer"][0] == "3" and rows["text_h20_hh_rate_in_cache"][0] == "0.7"
    assert rows["text_init_cache"][0] == "20"


def test_fastv_keep_is_the_share_kept_and_the_docs_say_r75_is_keep_025():
    assert "R=75%" in avl.FastV.__doc__ and "keep=0.25" in avl.FastV.__doc__
    readme = README.read_text()
    assert "R=75% (its fastest setting) is `keep=0.25`" in readme
