"""The A-VL authors' release flags -> avl policies, to reproduce a published run exactly.

The release (github.com/2147483647-2/A-VL: a modified transformers 4.39.2 and lmms-eval) is driven
by command-line flags of `python -m lmms_eval` (`lmms_eval/__main__.py`). Its README documents
eight of them; the others have defaults that every run following the README used, and three of
those differ from `AVL`'s own defaults: `prefill_filter_layer=3` (AVL: 2),
`text_h20_hh_rate_in_cache=0.7` (AVL: 0.5) and `text_init_cache=20` (AVL: 4). `RELEASE_FLAGS` is
the table of every flag, its command-line default and the field it sets; `release_fields` /
`release_policy` apply it (`AVL.from_release_flags` is the constructor for A-VL runs).

The release's rates are shares DROPPED, avl's ratios shares KEPT: `field = 1 - rate`, kept as the
float the release computes (`int((1 - rate) * N)` there, `int(ratio * N)` here, the same double),
so `vision_adaptive_attention_rate=0.55` gives `secondary=0.44999999999999996`, and the counts
agree with the release's for every N. A flag absent from the call takes the release's default.
Boolean flags take True / False or the release's strings "true" / "false".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from avl.cache.policies import AVL, H2O, FastV, Full, Policy

__all__ = ["RELEASE_FLAGS", "ReleaseFlag", "release_fields", "release_policy"]


@dataclass(frozen=True)
class ReleaseFlag:
    """One flag of the release: its command-line default, the avl field it sets (None: none), how."""

    name: str
    default: bool | int | float
    field: str | None
    rule: str


RELEASE_FLAGS: tuple[ReleaseFlag, ...] = (
    ReleaseFlag("vision_adaptive_attention", False, None, "turns S (and C, K) on"),
    ReleaseFlag("vision_adaptive_attention_rate", 0.5, "secondary", "`1 - rate`: image rows kept per layer (S)"),
    ReleaseFlag("vision_adaptive_attention_compute_rate", 0.6, "core",
                "`1 - compute_rate` (C), only when `update_interval > 0`"),
    ReleaseFlag("vision_adaptive_attention_update_interval", -1, "refresh_every",
                "K when > 0; otherwise no core split: every kept image row is computed (core and refresh_every "
                "None, compute_rate ignored, as in the release)"),
    ReleaseFlag("prefill_filter_flag", False, None, "turns P on"),
    ReleaseFlag("prefill_filter_layer", 3, "prefill_layer",
                "the same number: image hidden states are dropped after layer index `prefill_filter_layer - 1`"),
    ReleaseFlag("prefill_filter_rate", 0.5, "prefill_keep", "`1 - rate`: image tokens kept in prefill (P)"),
    ReleaseFlag("text_pruning_flag", False, None, "turns T on"),
    ReleaseFlag("text_pruning_rate", 0.5, "text_keep", "`1 - rate`: text rows kept (T)"),
    ReleaseFlag("text_init_cache", 20, "text_min_budget", "the same: the text budget's minimum"),
    ReleaseFlag("text_h20_hh_rate_in_cache", 0.7, "text_heavy_share",
                "the same: heavy-hitter share of the text budget"),
    ReleaseFlag("text_use_h2o", True, None,
                "must be true with `text_pruning_flag`: the release's other text rule is not implemented in avl"),
    ReleaseFlag("compare_text_direct_pruning", False, None,
                "must be false: the release's direct text pruning comparison is not implemented in avl"),
    ReleaseFlag("text_pruning_interval", 8, None,
                "no effect: the release's check that would read it is disabled (`if True:`); text is pruned at "
                "every step"),
    ReleaseFlag("all_use_h2o", False, None,
                "the H2O baseline: `H2O(budget=0.5, heavy_share=0.25)` (hard-coded in the release), not an AVL"),
    ReleaseFlag("h2o_hh_size", 32, None,
                "no effect on these runs: each H2O call passes sizes computed from the budget instead"),
    ReleaseFlag("h2o_recent_size", 255, None,
                "no effect on these runs: each H2O call passes sizes computed from the budget instead"),
    ReleaseFlag("auto_half_h2o", False, None, "no effect: the release's code that reads it is commented out"),
)

_BY_NAME = {flag.name: flag for flag in RELEASE_FLAGS}
_SWITCHES = ("vision_adaptive_attention", "prefill_filter_flag", "text_pruning_flag")


def _resolve(flags: Mapping[str, Any]) -> dict[str, Any]:
    """Every flag's value (the release's default where absent), types checked, names checked."""
    unknown = sorted(set(flags) - set(_BY_NAME))
    if unknown:
        raise ValueError(f"unknown release flag(s) {unknown}; allowed: {[f.name for f in RELEASE_FLAGS]}")
    values = {}
    for flag in RELEASE_FLAGS:
        value = flags.get(flag.name, flag.default)
        if isinstance(flag.default, bool):
            if value in ("true", "false"):
                value = value == "true"
            if not isinstance(value, bool):
                raise ValueError(f"{flag.name}={value!r} is invalid; allowed: True / False or 'true' / 'false'")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or \
                (isinstance(flag.default, int) and not isinstance(value, int)):
            kind = "an integer" if isinstance(flag.default, int) else "a number"
            raise ValueError(f"{flag.name}={value!r} is a {type(value).__name__}; allowed: {kind}")
        elif flag.name.endswith("_rate") and not 0.0 <= value < 1.0:
            raise ValueError(f"{flag.name}={value!r} is out of range; allowed: a share dropped in [0, 1)")
        values[flag.name] = value
    if values["text_pruning_flag"] and (not values["text_use_h2o"] or values["compare_text_direct_pruning"]):
        raise ValueError("text_pruning_flag with text_use_h2o=false or compare_text_direct_pruning=true selects a text "
                         "rule of the release that avl does not implement; allowed: text_use_h2o=true, "
                         "compare_text_direct_pruning=false")
    if values["all_use_h2o"] and any(values[s] for s in _SWITCHES):
        raise ValueError(f"all_use_h2o=true with {[s for s in _SWITCHES if values[s]]} mixes the H2O baseline with "
                         "A-VL parts; allowed: all_use_h2o alone")
    return values


def release_fields(flags: Mapping[str, Any]) -> dict[str, Any]:
    """The `AVL` fields of a release run's flags (parts that are off keep AVL's defaults).

    Raises ValueError for an unknown flag, a bad value, a text rule avl does not implement, and
    for `all_use_h2o` (the H2O baseline is not an AVL: see `release_policy`).
    """
    values = _resolve(flags)
    if values["all_use_h2o"]:
        raise ValueError("all_use_h2o=true is the H2O baseline, not an AVL policy; use "
                         "avl.cache.release_flags.release_policy(...) (H2O(budget=0.5, heavy_share=0.25))")
    fields: dict[str, Any] = {}
    if values["vision_adaptive_attention"]:
        fields["secondary"] = 1 - values["vision_adaptive_attention_rate"]
        interval = values["vision_adaptive_attention_update_interval"]
        if interval > 0:
            fields["core"] = 1 - values["vision_adaptive_attention_compute_rate"]
            fields["refresh_every"] = interval
    if values["prefill_filter_flag"]:
        fields["prefill_keep"] = 1 - values["prefill_filter_rate"]
        fields["prefill_layer"] = values["prefill_filter_layer"]
    if values["text_pruning_flag"]:
        fields["text_keep"] = 1 - values["text_pruning_rate"]
        fields["text_min_budget"] = values["text_init_cache"]
        fields["text_heavy_share"] = values["text_h20_hh_rate_in_cache"]
    return fields


def release_policy(flags: Mapping[str, Any]) -> Policy:
    """The policy of a release run: `Full()` with no method on, `H2O(0.5, 0.25)` for `all_use_h2o`,
    `FastV` for the prefill filter alone (the paper's FastV baseline), else `AVL`."""
    values = _resolve(flags)
    if values["all_use_h2o"]:
        return H2O(budget=0.5, heavy_share=0.25)
    if not any(values[s] for s in _SWITCHES):
        return Full()
    fields = release_fields(flags)
    if set(fields) == {"prefill_keep", "prefill_layer"}:
        return FastV(layer=fields["prefill_layer"], keep=fields["prefill_keep"])
    return AVL(**fields)
