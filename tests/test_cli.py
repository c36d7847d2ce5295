"""The command line: demo on the embedded tiny checkpoint, generate on a checkpoint directory, errors."""

from __future__ import annotations

import pytest
from PIL import Image

from avl.cli import main
from avl.tiny import build_tiny_llava
from tiny_llava import build_tiny_mllama_checkpoint, build_tiny_next_checkpoint, build_tiny_qwen_checkpoint


def test_demo_prints_an_answer_and_the_cache_table(capsys):
    main(["demo", "--max-new-tokens", "3", "--policy", "avl", "--secondary", "0.5", "--text-keep", "0.5"])
    out, err = capsys.readouterr()
    assert "RANDOM weights" in err
    assert out.startswith("answer: ")
    assert "policy: AVL(secondary=0.5" in out
    total = [line for line in out.splitlines() if line.strip().startswith("total")][0].split()
    stored_percent = float(total[3])
    assert 40 < stored_percent < 70  # half the 576 image rows and half the text rows are kept


def test_generate_reads_a_checkpoint_directory(tmp_path, capsys):
    directory = build_tiny_llava(tmp_path / "tiny")
    Image.new("RGB", (50, 70), (200, 10, 10)).save(tmp_path / "red.png")
    main(["generate", "--model", str(directory), "--image", str(tmp_path / "red.png"), "--prompt", "Color?",
          "--max-new-tokens", "2", "--policy", "fastv", "--fastv-keep", "0.25"])
    out = capsys.readouterr().out
    assert out.startswith("answer: ") and "FastV(layer=2, keep=0.25)" in out


@pytest.mark.parametrize("argv,message", [
    (["demo", "--policy", "avl", "--window", "3"], "--window belongs to --policy streaming"),
    (["demo", "--policy", "avl", "--core", "0.5"], "core is set but secondary"),
    (["demo", "--policy", "h2o", "--h2o-budget", "1.5"], "budget=1.5"),
    (["generate", "--model", "x", "--image", "/no/such.png", "--prompt", "p"], "/no/such.png"),
])
def test_bad_arguments_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    captured = capsys.readouterr()
    assert message in captured.err


def test_generate_runs_a_llava_next_checkpoint(tmp_path, capsys):
    """LLaVA-NeXT through the CLI: its own processor (anyres tiles, image_sizes) and chat template."""
    directory = build_tiny_next_checkpoint(tmp_path / "next")
    Image.new("RGB", (90, 40), (10, 200, 10)).save(tmp_path / "wide.png")
    main(["generate", "--model", str(directory), "--image", str(tmp_path / "wide.png"), "--prompt", "Color?",
          "--max-new-tokens", "3", "--policy", "avl", "--secondary", "0.5"])
    out = capsys.readouterr().out
    assert out.startswith("answer: ") and "AVL(secondary=0.5" in out


def test_generate_runs_a_qwen_vl_checkpoint(tmp_path, capsys):
    """Qwen-VL through the CLI: its processor, chat format and stop ids."""
    directory = build_tiny_qwen_checkpoint(tmp_path / "qwen")
    Image.new("RGB", (60, 80), (30, 30, 200)).save(tmp_path / "blue.png")
    main(["generate", "--model", str(directory), "--image", str(tmp_path / "blue.png"), "--prompt", "Color?",
          "--max-new-tokens", "3", "--dtype", "float64", "--policy", "h2o"])
    out = capsys.readouterr().out
    assert out.startswith("answer: ") and "H2O(budget=0.5" in out


def test_generate_runs_a_llama_vision_checkpoint_with_trim(tmp_path, capsys):
    directory = build_tiny_mllama_checkpoint(tmp_path / "mllama")
    Image.new("RGB", (50, 90), (200, 200, 30)).save(tmp_path / "tall.png")
    main(["generate", "--model", str(directory), "--image", str(tmp_path / "tall.png"), "--prompt", "Color?",
          "--max-new-tokens", "3", "--policy", "trim", "--trim-keep", "0.5"])
    out = capsys.readouterr().out
    assert out.startswith("answer: ") and "Trim(keep=0.5" in out and "cross all" in out
