"""KeyMap: ordered prefix / regex rename rules and ignore patterns."""

from __future__ import annotations

import re

import pytest

from avl.weights import KeyMap


def test_identity() -> None:
    assert KeyMap().rename("model.layers.0.mlp.weight") == "model.layers.0.mlp.weight"


def test_two_layouts_in_one_table() -> None:
    keys = KeyMap(
        rules=[
            ("model.language_model.", "model."),
            ("language_model.model.", "model."),
            ("language_model.lm_head.", "lm_head."),
        ]
    )
    assert (
        keys.rename("model.language_model.layers.3.self_attn.q_proj.weight")
        == "model.layers.3.self_attn.q_proj.weight"
    )
    assert (
        keys.rename("language_model.model.layers.3.self_attn.q_proj.weight")
        == "model.layers.3.self_attn.q_proj.weight"
    )
    assert keys.rename("language_model.lm_head.weight") == "lm_head.weight"
    assert keys.rename("vision_tower.x") == "vision_tower.x"  # no rule: unchanged


def test_first_match_wins() -> None:
    keys = KeyMap(rules=[("a.b.", "first."), ("a.", "second.")])
    assert keys.rename("a.b.c") == "first.c"
    assert keys.rename("a.x") == "second.x"


def test_prefixes_are_plain_string_prefixes() -> None:
    keys = KeyMap(rules=[("layers.1.", "L1.")])
    assert keys.rename("layers.1.w") == "L1.w"
    assert keys.rename("layers.10.w") == "layers.10.w"


def test_regex_rule_rewrites_matched_prefix() -> None:
    keys = KeyMap(rules=[(re.compile(r"transformer\.h\.(\d+)\.attn\."), r"model.layers.\1.self_attn.")])
    assert keys.rename("transformer.h.12.attn.c_attn.weight") == "model.layers.12.self_attn.c_attn.weight"
    assert keys.rename("x.transformer.h.1.attn.w") == "x.transformer.h.1.attn.w"  # anchored at start


def test_ignore_is_checked_on_the_checkpoint_key_first() -> None:
    keys = KeyMap(rules=[("model.", "m.")], ignore=[r"rotary_emb\.inv_freq$", r"^vision\.layers\.23\."])
    assert keys.rename("model.layers.0.self_attn.rotary_emb.inv_freq") is None
    assert keys.rename("vision.layers.23.mlp.weight") is None
    assert keys.rename("vision.layers.2.mlp.weight") == "vision.layers.2.mlp.weight"
    assert keys.rename("model.norm.weight") == "m.norm.weight"


def test_bad_rule_and_bad_regex() -> None:
    with pytest.raises(ValueError, match=r"KeyMap rule \('a\.',\) must be"):
        KeyMap(rules=[("a.",)])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"KeyMap rule \('a\.', 3\) must be"):
        KeyMap(rules=[("a.", 3)])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"ignore pattern '\(' is not a valid regex"):
        KeyMap(ignore=["("])
    with pytest.raises(ValueError, match="sequence of regexes, got the string"):
        KeyMap(ignore="inv_freq")


def test_keymap_is_immutable_and_comparable() -> None:
    a = KeyMap(rules=[("a.", "b.")], ignore=["x"])
    assert a == KeyMap(rules=[("a.", "b.")], ignore=["x"])
    with pytest.raises(AttributeError):
        a.rules = ()  # type: ignore[misc]
