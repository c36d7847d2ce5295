"""The command line: demo on the embedded tiny checkpoint, generate on a checkpoint directory, errors."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from avl.cli import main
from avl.testing.llava_checkpoint import build_tiny_llava
from tiny_llava import (
    build_tiny_mllama_checkpoint,
    build_tiny_next_checkpoint,
    build_tiny_onevision_checkpoint,
    build_tiny_qwen_checkpoint,
)


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
    (["demo", "--policy", "avl", "--positions", "original"], "--positions belongs to --policy streaming"),
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


def test_generate_runs_a_llava_onevision_checkpoint(tmp_path, capsys):
    """LLaVA-OneVision through the CLI: its processor (anyres_max tiles, image_sizes, batch_num_images),
    the checkpoint's chat template, Qwen2 stop ids; float64 weights from float32 pixels."""
    directory = build_tiny_onevision_checkpoint(tmp_path / "onevision")
    Image.new("RGB", (90, 30), (10, 200, 10)).save(tmp_path / "wide.png")
    main(["generate", "--model", str(directory), "--image", str(tmp_path / "wide.png"), "--prompt", "Color?",
          "--max-new-tokens", "3", "--dtype", "float64", "--policy", "avl", "--secondary", "0.5", "--text-keep", "0.5"])
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


# --- user errors: one line `avl <cmd>: error: ...`, exit 2, no traceback (issue 11, items 1, 3, 6) ---------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = build_tiny_llava(tmp_path_factory.mktemp("tiny"))
    image = directory.parent / "red.png"
    Image.new("RGB", (50, 70), (200, 10, 10)).save(image)
    return directory, image


def error_line(argv: list[str], capsys) -> str:
    """Run `avl argv`, expect exit 2 and exactly one stderr line (no traceback); return it."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def generate_argv(tiny, *extra: str) -> list[str]:
    directory, image = tiny
    return ["generate", "--model", str(directory), "--image", str(image), "--prompt", "Color?",
            "--max-new-tokens", "2", *extra]


def layer_rows(out: str, layer: int = 0) -> float:
    """Stored rows of one layer in the printed cache table."""
    return float(next(line.split()[1] for line in out.splitlines() if line.split()[:1] == [str(layer)]))


def test_generate_takes_several_images_in_one_prompt(tiny, tmp_path, capsys):
    green = tmp_path / "green.png"
    Image.new("RGB", (90, 40), (10, 200, 10)).save(green)
    main(generate_argv(tiny))
    one = capsys.readouterr().out
    main(generate_argv(tiny, "--image", str(green)))
    two = capsys.readouterr().out
    assert two.startswith("answer: ")
    assert layer_rows(two) - layer_rows(one) == 576 + 1  # the second image: its 576 rows and the newline after it
    with pytest.raises(SystemExit):
        main(generate_argv(tiny, "--image", str(tmp_path / "missing.png")))
    err = capsys.readouterr().err
    assert err.startswith("avl generate: error: --image ") and "missing.png: no such file" in err.replace("'", "")


def test_stream_prints_the_same_answer_as_it_is_generated(tiny, capsys):
    main(generate_argv(tiny, "--max-new-tokens", "6"))
    plain = capsys.readouterr().out
    main(generate_argv(tiny, "--max-new-tokens", "6", "--stream"))
    assert capsys.readouterr().out == plain


def test_user_errors_of_generate_are_one_line_with_exit_2(tiny, tmp_path, capsys, monkeypatch):
    empty = tmp_path / "not-a-checkpoint"
    empty.mkdir()
    lines = {
        "bad checkpoint": error_line(["generate", "--model", str(empty), "--image", str(tiny[1]), "--prompt", "p"],
                                     capsys),
        "trim on llava": error_line(generate_argv(tiny, "--policy", "trim"), capsys),
        "layer too deep": error_line(generate_argv(tiny, "--policy", "avl", "--prefill-keep", "0.5",
                                                   "--prefill-layer", "9"), capsys),
        "placeholders": error_line(generate_argv(tiny)[:-2] + ["--prompt", "<image> twice?"], capsys),
        "zero tokens": error_line(generate_argv(tiny, "--max-new-tokens", "0"), capsys),
    }
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    lines["cuda"] = error_line(generate_argv(tiny, "--device", "cuda"), capsys)
    assert all(line.startswith("avl generate: error: ") for line in lines.values()), lines
    assert "not-a-checkpoint" in lines["bad checkpoint"] and "config.json" in lines["bad checkpoint"]
    assert "this model has none" in lines["trim on llava"]
    assert "prefill_layer=9 is out of range; allowed: [1, 3]" in lines["layer too deep"]
    assert "image" in lines["placeholders"] and "2" in lines["placeholders"]
    assert "argument --max-new-tokens: 0 is invalid; allowed: an integer >= 1" in lines["zero tokens"]
    assert "device='cuda' is not available" in lines["cuda"]


def test_debug_shows_the_traceback(tiny, monkeypatch):
    with pytest.raises(ValueError, match="this model has none"):
        main(generate_argv(tiny, "--policy", "trim", "--debug"))
    monkeypatch.setenv("AVL_DEBUG", "1")
    with pytest.raises(ValueError, match="prefill_layer=9"):
        main(generate_argv(tiny, "--policy", "avl", "--prefill-keep", "0.5", "--prefill-layer", "9"))


def test_demo_refuses_a_non_empty_out_directory(tmp_path, capsys):
    out = tmp_path / "my-model"
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}')
    (out / "model.safetensors.index.json").write_text("{}")
    line = error_line(["demo", "--out", str(out), "--max-new-tokens", "1"], capsys)
    assert line.startswith("avl demo: error: --out ") and str(out) in line and "--overwrite" in line
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors.index.json"]
    assert (out / "config.json").read_text() == '{"mine": true}'
    file = tmp_path / "a-file"
    file.write_text("x")
    assert "is a file" in error_line(["demo", "--out", str(file)], capsys)


def test_demo_overwrites_with_overwrite(tmp_path, capsys):
    out = tmp_path / "scratch"
    out.mkdir()
    (out / "config.json").write_text("{}")
    main(["demo", "--out", str(out), "--overwrite", "--max-new-tokens", "1"])
    assert capsys.readouterr().out.startswith("answer: ")
    assert '"model_type": "llava"' in (out / "config.json").read_text()


def test_streaming_positions_is_a_policy_option():
    import argparse

    from avl.cache.policies import StreamingLLM
    from avl.cli_policies import add_policy_options, policy_from_args

    parser = argparse.ArgumentParser()
    add_policy_options(parser)
    args = parser.parse_args(["--policy", "streaming", "--window", "8", "--positions", "original"])
    assert policy_from_args(args) == StreamingLLM(window=8, positions="original")
    assert policy_from_args(parser.parse_args(["--policy", "streaming"])).positions == "shifted"
