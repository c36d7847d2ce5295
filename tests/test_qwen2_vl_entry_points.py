"""Qwen2-VL / Qwen2.5-VL through the user entry points: `load_chat_processor` + `avl.generate` against
transformers' generation on the same processor outputs, `avl generate` on a checkpoint directory, and
`avl eval`'s family entries (lmms-eval's qwen2_vl / qwen2_5_vl prompt and output rules)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import avl
from avl.cli import main
from avl.eval import EvalConfig, evaluate, get_family
from avl.processing import qwen2_vl_prompt, render_chat_template
from avl.processing.auto import load_chat_processor
from avl.testing.eval_data import write_tiny_parquet
from tiny_qwen2_vl import CHAT_TEMPLATE, build_checkpoint

FAMILIES = ("qwen2_vl", "qwen2_5_vl")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    return directory, build_checkpoint(directory, request.param)


@pytest.mark.parametrize("system", [None, "Be brief."])
def test_prompt_is_what_the_hub_chat_template_renders(system):
    question = "What is in the picture?"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    expected = render_chat_template(CHAT_TEMPLATE, messages, add_generation_prompt=True)
    assert (qwen2_vl_prompt(question) if system is None else qwen2_vl_prompt(question, system)) == expected


@torch.inference_mode()
def test_chat_processor_inputs_generate_what_transformers_generates(checkpoint):
    directory, hf = checkpoint
    processor = load_chat_processor(directory)
    g = torch.Generator().manual_seed(0)
    images = [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())
              for h, w in ((60, 110), (130, 50))]
    inputs = processor(["Describe this image.", "How many dogs are there?"], images)
    assert inputs["image_grid_thw"].tolist() != [inputs["image_grid_thw"][0].tolist()] * 2  # different sizes
    steps = 8
    ref = hf.generate(**{k: v.to(torch.float64) if v.is_floating_point() else v for k, v in inputs.items()},
                      max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    model = avl.load(directory).set_reference_casts()
    out = avl.generate(model, **inputs, max_new_tokens=steps)
    assert out.tokens.tolist() == ref[:, inputs["input_ids"].shape[1]:].tolist()
    assert processor.stop_token_ids == (processor.processor.tokenizer.token_to_id("<|im_end|>"),
                                        processor.processor.tokenizer.token_to_id("<|endoftext|>"))


def test_two_image_prompt_is_what_the_hub_chat_template_renders():
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Which is larger?"}]
    expected = render_chat_template(CHAT_TEMPLATE, [{"role": "user", "content": content}], add_generation_prompt=True)
    assert qwen2_vl_prompt("Which is larger?", n_images=2) == expected


@torch.inference_mode()
def test_two_images_in_one_prompt_generate_what_transformers_generates(checkpoint):
    directory, hf = checkpoint
    processor = load_chat_processor(directory)
    g = torch.Generator().manual_seed(1)
    images = [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())
              for h, w in ((60, 110), (130, 50))]
    inputs = processor(["Compare them."], [images])
    assert inputs["image_grid_thw"].shape[0] == 2 and inputs["input_ids"].shape[0] == 1
    steps = 6
    ref = hf.generate(**{k: v.to(torch.float64) if v.is_floating_point() else v for k, v in inputs.items()},
                      max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    out = avl.generate(avl.load(directory).set_reference_casts(), **inputs, max_new_tokens=steps)
    assert out.tokens.tolist() == ref[:, inputs["input_ids"].shape[1]:].tolist()


def test_cli_generate_runs_the_checkpoint(checkpoint, tmp_path, capsys):
    directory, _ = checkpoint
    Image.new("RGB", (90, 40), (10, 200, 10)).save(tmp_path / "wide.png")
    main(["generate", "--model", str(directory), "--image", str(tmp_path / "wide.png"), "--prompt", "Color?",
          "--max-new-tokens", "3", "--dtype", "float64", "--policy", "avl", "--secondary", "0.5"])
    out = capsys.readouterr().out
    assert out.startswith("answer: ") and "AVL(secondary=0.5" in out


def test_eval_families_follow_lmms_eval():
    for name in FAMILIES:
        family = get_family(name)
        assert family.lmms_eval_model == name
        assert family.prompt("<image>What color? Answer briefly.") == qwen2_vl_prompt("What color? Answer briefly.")
        assert family.postprocess(" Red.\nUSER: more", ["USER:"]) == " Red.\n"  # cut at until, not stripped
    assert get_family("qwen2_vl").postprocess("Red\n\nBlue", ["\n\n"]) == "Red"
    assert get_family("qwen2_5_vl").postprocess("Red\n\nBlue", ["\n\n"]) == "Red\n\nBlue"  # its wrapper drops "\n\n"


def test_eval_runs_a_qwen2_vl_checkpoint(tmp_path):
    directory = tmp_path / "qwen2_vl"
    build_checkpoint(directory, "qwen2_vl")
    data = write_tiny_parquet("vqav2_val", tmp_path / "data", n=2)
    summary = evaluate(EvalConfig(model=str(directory), task="vqav2_val", data=str(data), out=str(tmp_path / "out"),
                                  progress=False, max_new_tokens=3, batch_size=2, dtype="float64",
                                  policy=avl.AVL(secondary=0.5, text_keep=0.5)))
    assert (summary["samples"], summary["failed"]) == (2, 0)
    assert summary["kv_cache"]["stored_pct"] < 90
