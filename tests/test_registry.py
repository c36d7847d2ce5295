"""One table of policy names (avl.cache.registry.POLICIES) behind `avl generate`, `avl eval` and sweeps;
command-line options and grid fields come from the policies' dataclass fields."""

from __future__ import annotations

import dataclasses

import pytest

import avl
from avl.cache.registry import POLICIES, parse_policy, policy_name
from avl.cli import build_parser, policy_from_args
from avl.eval.sweep import parse_grid, policy_label, policy_slug


def generate_args(*extra: str):
    return build_parser().parse_args(["generate", "--model", "m", "--image", "i", "--prompt", "p", *extra])


def test_generate_help_lists_every_policys_fields(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, cls in POLICIES.items():
        assert name in text
        for field in dataclasses.fields(cls):
            assert f"--{name}-{field.name.replace('_', '-')}" in text, (name, field.name)
            assert f"{cls.__name__}.{field.name}" in text


def test_a_field_added_to_a_policy_dataclass_appears_without_editing_the_cli(monkeypatch, capsys):
    @dataclasses.dataclass(frozen=True)
    class BoostedSnapKV(avl.SnapKV):
        boost: float = 1.0
        stages: tuple[int, ...] = (1, 2)

    monkeypatch.setitem(POLICIES, "boosted", BoostedSnapKV)
    args = generate_args("--policy", "boosted", "--boosted-boost", "2.5", "--boosted-stages", "3,4",
                         "--boosted-window-size", "8")
    assert policy_from_args(args) == BoostedSnapKV(boost=2.5, stages=(3, 4), window_size=8)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--help"])
    assert "--boosted-boost" in capsys.readouterr().out
    assert parse_grid("boosted: boost=1,2 stages=5/6")[0] == [BoostedSnapKV(boost=1.0, stages=(5, 6)),
                                                              BoostedSnapKV(boost=2.0, stages=(5, 6))]


def test_every_field_of_the_new_policies_is_settable_from_the_command_line():
    assert policy_from_args(generate_args("--policy", "snapkv", "--snapkv-keep", "0.3", "--snapkv-window-size",
                                          "8", "--snapkv-kernel-size", "3")) == avl.SnapKV(0.3, 8, 3)
    assert policy_from_args(generate_args("--policy", "pyramidkv", "--pyramidkv-beta", "4")) == avl.PyramidKV(beta=4)
    assert policy_from_args(generate_args("--policy", "adakv", "--adakv-scorer", "knorm(keep=0.3)",
                                          "--adakv-alpha-safeguard", "0.1")) == avl.AdaKV(avl.KNorm(0.3), 0.1)
    assert policy_from_args(generate_args("--policy", "random", "--random-seed", "3")) == avl.RandomEviction(seed=3)
    assert policy_from_args(generate_args("--policy", "pyramiddrop", "--pyramiddrop-layers", "2,4")) == \
        avl.PyramidDrop(layers=(2, 4))
    # the flags that predate the derived ones still work, and the derived ones name the same fields
    assert policy_from_args(generate_args("--policy", "avl", "--secondary", "0.5", "--avl-text-keep", "0.5")) == \
        avl.AVL(secondary=0.5, text_keep=0.5)
    assert policy_from_args(generate_args("--policy", "streaming", "--window", "8")) == avl.StreamingLLM(window=8)


@pytest.mark.parametrize("argv,match", [
    (["--policy", "knorm", "--snapkv-keep", "0.3"], "--snapkv-keep belongs to --policy snapkv, not --policy knorm"),
    (["--policy", "snapkv", "--snapkv-window-size", "eight"], "window_size='eight' is not a int"),
    (["--policy", "snapkv", "--snapkv-keep", "2"], r"keep=2.0 is out of range; allowed: a number in \(0, 1\]"),
    (["--policy", "adakv", "--adakv-scorer", "observed"], "scorer=ObservedAttention.* is not allowed"),
    (["--policy", "adakv", "--adakv-scorer", "snap"], "scorer='snap': unknown policy 'snap'; known: full, avl"),
    (["--policy", "adakv", "--adakv-scorer", "knorm(budget=1)"], "'budget=1' is not field=value of knorm"),
    (["--policy", "pyramiddrop", "--pyramiddrop-layers", "2,x"], r"layers='2,x' is not a ints a,b,\.\.\."),
])
def test_bad_values_are_named(argv, match):
    with pytest.raises(ValueError, match=match):
        policy_from_args(generate_args(*argv))


def test_sweeps_take_the_new_policies_and_name_them():
    policies, skipped = parse_grid("adakv: scorer=knorm(keep=0.3),snapkv(keep=0.5;window_size=8) alpha_safeguard=0.1")
    assert policies == [avl.AdaKV(avl.KNorm(0.3), 0.1), avl.AdaKV(avl.SnapKV(0.5, window_size=8), 0.1)]
    assert not skipped
    assert policy_label(policies[0]) == "adakv scorer=knorm(keep=0.3) alpha_safeguard=0.1"
    assert policy_slug(parse_grid("pyramiddrop: layers=2/4")[0][0]) == "pyramiddrop-layers2_4-keep0.5"
    assert parse_grid("snapkv: keep=0.3,0.5")[0] == [avl.SnapKV(0.3), avl.SnapKV(0.5)]
    assert [policy_name(cls()) for cls in POLICIES.values()] == list(POLICIES)
    assert parse_policy("random(seed=2)") == avl.RandomEviction(seed=2)
