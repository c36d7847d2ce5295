"""One table of policy names (avl.cache.registry.POLICIES) behind `avl generate`, `avl eval` and sweeps;
command-line options and grid fields come from the policies' dataclass fields."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

import avl
from avl.cache.registry import POLICIES, parse_policy, policy_name
from avl.cli import build_parser
from avl.cli_policies import policy_from_args
from avl.eval.sweep import parse_grid, policy_label, policy_slug

ROOT = Path(__file__).resolve().parents[1]


def generate_args(*extra: str):
    return build_parser().parse_args(["generate", "--model", "m", "--image", "i", "--prompt", "p", *extra])


POLICY_COMMANDS = ("generate", "demo", "eval")  # the subcommands that take a cache policy


def help_text(command: str, capsys) -> str:
    """`avl <command> --help`, whitespace-normalised."""
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("command", POLICY_COMMANDS)
def test_help_lists_every_policys_fields(command, capsys):
    text = help_text(command, capsys)
    for name, cls in POLICIES.items():
        assert name in text
        for field in dataclasses.fields(cls):
            assert f"--{name}-{field.name.replace('_', '-')}" in text, (command, name, field.name)
            assert f"{cls.__name__}.{field.name}" in text


def test_python_m_avl_eval_lists_them_without_importing_avl_cli():
    """`python -m avl.eval` builds the same policy options from avl.cli_policies; nothing imports avl.cli back."""
    code = ("import sys\nfrom avl.eval.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'avl.cli' not in sys.modules, 'avl.cli was imported'")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "--snapkv-window-size" in run.stdout and "--pyramiddrop-layers" in run.stdout


def test_a_field_added_to_a_policy_dataclass_appears_without_editing_the_cli(monkeypatch, capsys):
    @dataclasses.dataclass(frozen=True)
    class BoostedSnapKV(avl.SnapKV):
        boost: float = 1.0
        stages: tuple[int, ...] = (1, 2)

    monkeypatch.setitem(POLICIES, "boosted", BoostedSnapKV)
    args = generate_args("--policy", "boosted", "--boosted-boost", "2.5", "--boosted-stages", "3,4",
                         "--boosted-window-size", "8")
    assert policy_from_args(args) == BoostedSnapKV(boost=2.5, stages=(3, 4), window_size=8)
    eval_args = build_parser().parse_args(["eval", "--model", "m", "--task", "t", "--data", "d", "--policy", "boosted",
                                           "--boosted-boost", "0.5"])
    assert policy_from_args(eval_args) == BoostedSnapKV(boost=0.5)
    for command in POLICY_COMMANDS:
        text = help_text(command, capsys)
        assert "--boosted-boost" in text and "BoostedSnapKV.stages" in text, command
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
