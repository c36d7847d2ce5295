"""`avl analyze`: one image on each family with image rows in the sequence and on Llama-3.2-Vision
(cross-attention layers), an eval task's samples averaged, the figures, and one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from avl.analysis.figures import FIGURES
from avl.cli import main
from avl.testing.eval_data import write_tiny_jsonl, write_tiny_parquet
from avl.testing.llava_checkpoint import build_tiny_llava
from tiny_llava import (
    build_tiny_mllama_checkpoint,
    build_tiny_next_checkpoint,
    build_tiny_onevision_checkpoint,
    build_tiny_qwen_checkpoint,
)
from tiny_qwen2_vl import build_checkpoint as build_qwen2_vl_checkpoint

KEYS = {"tokens", "modal_shares", "concentration", "ppci_layers", "ppci_steps", "n_image", "top", "mass", "samples",
        "attention", "decoder_layers"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add overhead
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("image") / "red.png"
    Image.new("RGB", (50, 70), (200, 10, 10)).save(path)
    return path


def check_report(data: dict, steps: int, layers: int) -> None:
    assert KEYS <= data.keys()
    assert data["attention"] == "self" and data["decoder_layers"] == list(range(layers))
    assert len(data["modal_shares"]) == len(data["concentration"]) == steps
    assert len(data["ppci_layers"]) == len(data["ppci_steps"]) == layers
    assert all(len(row) == layers for row in data["concentration"])
    assert all(len(row) == steps for row in data["ppci_steps"])
    for shares in data["modal_shares"]:
        assert set(shares) == {"system", "image", "instruction", "generated"}
        assert abs(sum(shares.values()) - 1.0) <= 1e-6
    assert data["modal_shares"][0]["generated"] == 0.0 and data["modal_shares"][1]["generated"] > 0.0
    assert data["ppci_layers"][0] == 1.0 and all(row[0] == 1.0 for row in data["ppci_steps"])
    assert all(0.0 < c <= 1.0 for row in data["concentration"] for c in row)


def check_figures(out, names=FIGURES) -> None:
    for name in names:
        path = out / name
        assert path.stat().st_size > 5000, name
        with Image.open(path) as figure:
            assert figure.format == "PNG" and figure.size == (720, 460)
            figure.load()
            assert len(figure.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 50, name  # drawn, not blank


def test_one_image_writes_the_report_and_the_figures(llava, image, tmp_path, capsys):
    out = tmp_path / "out"
    main(["analyze", "--model", str(llava), "--image", str(image), "--prompt", "Color?", "--max-new-tokens", "5",
          "--top", "0.25", "--mass", "0.9", "--out", str(out)])
    printed = capsys.readouterr().out
    assert printed.startswith("answer: ") and "analysis.json" in printed
    data = json.loads((out / "analysis.json").read_text())
    check_report(data, steps=5, layers=4)
    assert (data["n_image"], data["top"], data["mass"], data["samples"]) == (576, 0.25, 0.9, 1)
    assert len(data["tokens"]) == 5
    check_figures(out)


def build_qwen2_vl(directory):
    build_qwen2_vl_checkpoint(directory, "qwen2_vl")
    return directory


@pytest.mark.parametrize("build,dtype,layers", [(build_tiny_next_checkpoint, "float32", 2),
                                                (build_tiny_qwen_checkpoint, "float64", None),
                                                (build_qwen2_vl, "float64", 2),
                                                (build_tiny_onevision_checkpoint, "float32", 3)],
                         ids=["llava_next", "qwen_vl", "qwen2_vl", "llava_onevision"])
def test_other_families(build, dtype, layers, image, tmp_path):
    directory = build(tmp_path / "model")
    out = tmp_path / "out"
    main(["analyze", "--model", str(directory), "--image", str(image), "--prompt", "Color?", "--max-new-tokens", "3",
          "--dtype", dtype, "--out", str(out)])
    data = json.loads((out / "analysis.json").read_text())
    layers = layers or json.loads((directory / "config.json").read_text())["num_hidden_layers"]
    check_report(data, steps=3, layers=layers)
    assert all((out / name).is_file() for name in FIGURES)


@pytest.mark.parametrize("layout", ["jsonl", "parquet"])
def test_an_eval_task_is_averaged_with_a_progress_bar(llava, tmp_path, capsys, layout):
    task = "flickr30k_test"
    data_path = (write_tiny_jsonl(task, tmp_path / "data", n=3) if layout == "jsonl"
                 else write_tiny_parquet(task, tmp_path / "data", n=3))
    out = tmp_path / "out"
    main(["analyze", "--model", str(llava), "--sweep-data", str(data_path), "--task", task, "--limit", "2",
          "--max-new-tokens", "3", "--out", str(out)])
    progress = capsys.readouterr().err
    assert "avl analyze" in progress and "2/2" in progress
    data = json.loads((out / "analysis.json").read_text())
    check_report(data, steps=3, layers=4)
    assert data["samples"] == 2 and data["task"] == task and data["tokens"] == []
    assert [(s["index"], len(s["tokens"])) for s in data["per_sample"]] == [(0, 3), (1, 3)]
    check_figures(out)


def test_the_sweep_mean_is_the_mean_of_the_samples(llava, tmp_path):
    """Each sample alone (--limit 1 on a one-row file), then both together."""
    task = "flickr30k_test"
    rows = write_tiny_jsonl(task, tmp_path / "data", n=2).read_text().splitlines()
    singles = []
    for i, row in enumerate(rows):
        one = tmp_path / "data" / f"row{i}.jsonl"
        one.write_text(row + "\n")
        main(["analyze", "--model", str(llava), "--sweep-data", str(one), "--task", task, "--max-new-tokens", "3",
              "--no-progress", "--out", str(tmp_path / f"one{i}")])
        singles.append(json.loads((tmp_path / f"one{i}" / "analysis.json").read_text()))
    main(["analyze", "--model", str(llava), "--sweep-data", str(tmp_path / "data" / "data.jsonl"), "--task", task,
          "--max-new-tokens", "3", "--no-progress", "--out", str(tmp_path / "both")])
    both = json.loads((tmp_path / "both" / "analysis.json").read_text())
    assert both["samples"] == 2
    for key in ("concentration", "ppci_layers", "ppci_steps", "n_image"):
        first, second, mean = (torch.tensor(d[key], dtype=torch.float64) for d in (*singles, both))
        assert (mean - (first + second) / 2).abs().max() <= 1e-12, key
    image_share = [(a["image"] + b["image"]) / 2 for a, b in zip(singles[0]["modal_shares"], singles[1]["modal_shares"])]
    assert max(abs(s["image"] - e) for s, e in zip(both["modal_shares"], image_share)) <= 1e-12


def test_llama_3_2_vision_writes_the_cross_attention_report(image, tmp_path):
    """Concentration and PPCI over the 2 cross-attention layers (decoder layers 1 and 3) and the image's
    feature rows; no modal shares, so no shares.png."""
    directory = build_tiny_mllama_checkpoint(tmp_path / "model")
    out = tmp_path / "out"
    main(["analyze", "--model", str(directory), "--image", str(image), "--prompt", "Color?", "--max-new-tokens", "4",
          "--out", str(out)])
    data = json.loads((out / "analysis.json").read_text())
    assert KEYS <= data.keys()
    assert (data["attention"], data["decoder_layers"], data["modal_shares"]) == ("cross", [1, 3], None)
    assert len(data["concentration"]) == 4 and all(len(row) == 2 for row in data["concentration"])
    assert len(data["ppci_steps"]) == 2 and all(len(row) == 4 for row in data["ppci_steps"])
    assert data["ppci_layers"][0] == 1.0 and all(row[0] == 1.0 for row in data["ppci_steps"])
    assert all(0.0 < c <= 1.0 for row in data["concentration"] for c in row)
    assert data["n_image"] > 0 and data["n_image"] % 5 == 0  # whole tiles of 4 patches + the class token
    check_figures(out, FIGURES[1:])
    assert not (out / FIGURES[0]).exists()


@pytest.mark.parametrize("argv,message", [
    (["--image", "IMG"], "--prompt is required"),
    (["--prompt", "p"], "--image is required"),
    (["--image", "IMG", "--prompt", "p", "--task", "flickr30k_test"], "--task belongs to --sweep-data"),
    (["--sweep-data", "x.jsonl", "--task", "flickr30k_test", "--image", "IMG"], "--image is for one image"),
    (["--sweep-data", "x.jsonl"], "--sweep-data needs --task"),
    (["--sweep-data", "/no/such.jsonl", "--task", "flickr30k_test"], "/no/such.jsonl"),
    (["--sweep-data", "x.jsonl", "--task", "nope"], "unknown task 'nope'"),
    (["--image", "/no/such.png", "--prompt", "p"], "--image '/no/such.png': no such file"),
    (["--image", "IMG", "--prompt", "p", "--top", "0"], "argument --top: 0 is invalid"),
    (["--image", "IMG", "--prompt", "p", "--mass", "x"], "argument --mass: 'x' is not a number"),
    (["--image", "IMG", "--prompt", "p", "--out", "FILE"], "is a file"),
], ids=["no-prompt", "no-image", "task-alone", "image-in-sweep", "no-task", "no-data", "bad-task", "missing-image",
        "top", "mass", "out-file"])
def test_errors_are_one_line_with_exit_status_2(argv, message, llava, image, tmp_path, capsys):
    (tmp_path / "FILE").write_text("x")
    swap = {"IMG": str(image), "FILE": str(tmp_path / "FILE")}
    argv = [swap.get(a, a) for a in argv]
    out = [] if "--out" in argv else ["--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        main(["analyze", "--model", str(llava), *out, *argv, "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("avl analyze: error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
