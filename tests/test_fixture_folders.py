"""The reference fixtures ship inside the repository; $AVL_REFERENCE_FIXTURES / $QWEN_VL_REFERENCE_FIXTURES
add folders to them (issue 11, item 10)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tiny_llava import FIXTURES, fixture_folders

REPO = Path(__file__).resolve().parents[1]


def test_the_fixtures_are_inside_the_repository():
    for folder in fixture_folders("avl-reference", "NO_SUCH_VARIABLE") + \
            fixture_folders("qwen-vl-reference", "NO_SUCH_VARIABLE"):
        assert folder.resolve().is_relative_to(REPO / "tests" / "fixtures")
        assert (folder / "expected.json").is_file() and (folder / "model.safetensors").is_file()


def test_the_environment_variable_adds_folders(tmp_path, monkeypatch):
    extra = tmp_path / "more"
    shutil.copytree(FIXTURES / "avl-reference" / "llava-tiny-seed0", extra / "llava-tiny-seed1")
    single = tmp_path / "single"
    shutil.copytree(FIXTURES / "avl-reference" / "llava-tiny-seed0", single)
    monkeypatch.setenv("AVL_REFERENCE_FIXTURES", f"{extra}:{single}:{FIXTURES / 'avl-reference'}")
    folders = fixture_folders("avl-reference", "AVL_REFERENCE_FIXTURES")
    assert folders == [FIXTURES / "avl-reference" / "llava-tiny-seed0", extra / "llava-tiny-seed1", single]


def test_an_environment_path_without_fixtures_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN_VL_REFERENCE_FIXTURES", str(tmp_path / "nothing-here"))
    with pytest.raises(FileNotFoundError, match=r"nothing-here \(from \$QWEN_VL_REFERENCE_FIXTURES\)"):
        fixture_folders("qwen-vl-reference", "QWEN_VL_REFERENCE_FIXTURES")
