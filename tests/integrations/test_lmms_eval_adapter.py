"""The lmms-eval adapter on the requests lmms-eval 0.7.3 made (recorded, see lmms_helpers), with or without
lmms-eval installed. References: ``avl eval`` on the same samples (generation, two policies, batched),
lmms-eval's multi-image prompt written out, transformers' LLaVA forward (loglikelihood, full cache) and
``avl.generate``'s logits (loglikelihood under a policy)."""

from __future__ import annotations

import dataclasses
import importlib
import json
import tomllib
from pathlib import Path

import pytest
import torch
from integrations.lmms_helpers import (
    N_DOCS,
    docs,
    llava_prompt,
    one_image,
    recorded,
    request,
    task_dict,
    transformers_continuation_loss,
    two_images,
    unwrap,
)

import avl
from avl.cache.registry import parse_policy
from avl.eval import EvalConfig, evaluate, get_family, get_task
from avl.families import FAMILIES
from avl.testing.eval_data import write_tiny_parquet
from avl.integrations.lmms_eval import AvlLmms, GenerationSettings, parse_model_args, prompt_for
from avl.testing.llava_checkpoint import build_tiny_llava

# the second policy as lmms-eval's --model_args parser hands it over (numbers already converted)
AVL_ARGS = {"policy": "avl", "secondary": 0.45, "core": 0.3, "refresh_every": 3, "prefill_keep": 0.9, "text_keep": 0.5}
AVL_POLICY = avl.AVL(secondary=0.45, core=0.3, refresh_every=3, prefill_keep=0.9, text_keep=0.5)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only add overhead
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_parquet("docvqa_val", tmp_path_factory.mktemp("docvqa"), n=N_DOCS)


def adapter(checkpoint, **model_args) -> AvlLmms:
    model = AvlLmms(pretrained=str(checkpoint), **model_args)
    model.task_dict = task_dict()
    return model


# -- model_args ------------------------------------------------------------------------------------


def test_model_args_give_the_registry_policy():
    args, policy = parse_model_args({"pretrained": "ckpt", **AVL_ARGS, "dtype": "float16", "batch_size": "4"})
    assert policy == AVL_POLICY == parse_policy("avl(secondary=0.45;core=0.3;refresh_every=3;prefill_keep=0.9;"
                                                "text_keep=0.5)")
    assert (args.pretrained, args.dtype, args.batch_size, args.device) == ("ckpt", "float16", 4, None)
    assert parse_model_args({"pretrained": "ckpt"})[1] == avl.Full()
    # a tuple field (`/` between items, since `,` separates model_args), a none, a policy-typed field
    assert parse_model_args({"pretrained": "c", "policy": "pyramiddrop", "layers": "2/3", "keep": 0.5})[1] == \
        avl.PyramidDrop(layers=(2, 3), keep=0.5)
    assert parse_model_args({"pretrained": "c", "policy": "avl", "secondary": "none"})[1] == avl.AVL()
    assert parse_model_args({"pretrained": "c", "policy": "adakv", "scorer": "snapkv(window_size=8)"})[1] == \
        avl.AdaKV(scorer=avl.SnapKV(window_size=8))


@pytest.mark.parametrize("args,message", [
    ({"policy": "avl", "secondary": 0.45}, "needs pretrained="),
    ({"pretrained": "c", "policy": "avl", "sinks": 4}, "sinks=4 is unknown (a field of policy streaming, not of "
                                                       "policy avl); allowed: pretrained, dtype"),
    ({"pretrained": "c", "colour": "red"}, "colour='red' is unknown; allowed: pretrained, dtype, device"),
    ({"pretrained": "c", "policy": "fastvv"}, "unknown policy 'fastvv'; known: full, avl"),
    ({"pretrained": "c", "policy": "avl", "secondary": "half"}, "secondary='half' is not a float or none"),
    ({"pretrained": "c", "policy": "avl", "secondary": 0.2, "core": 0.3, "refresh_every": 2}, "core=0.3 exceeds"),
    ({"pretrained": "c", "dtype": "float8"}, "dtype='float8' is invalid; allowed: float32, float16"),
    ({"pretrained": "c", "batch_size": "auto"}, "batch_size='auto' is not a int"),
    ({"pretrained": "c", "batch_size": 0}, "batch_size=0 is invalid; allowed: an integer >= 1"),
    ({"pretrained": "c", "max_batch_size": 8}, "max_batch_size=8 is invalid; allowed: unset"),
])
def test_bad_model_args_name_the_value_and_what_is_allowed(args, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_model_args(args)


def test_a_policy_that_cannot_run_on_the_model_fails_at_load(checkpoint):
    with pytest.raises(ValueError, match="cross-attention"):
        AvlLmms(pretrained=str(checkpoint), policy="trim")  # Trim needs cross-attention layers; LLaVA has none


def test_several_processes_are_refused(checkpoint, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # accelerate / torchrun: each process would answer every request
    with pytest.raises(ValueError, match="WORLD_SIZE='2': the avl lmms-eval model runs in one process"):
        AvlLmms(pretrained=str(checkpoint))


def test_the_entry_point_names_the_manifest():
    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    target = project["project"]["entry-points"]["lmms_eval.models"]["avl"]
    module, _, name = target.partition(":")
    assert callable(getattr(importlib.import_module(module), name))


# -- generate_until ---------------------------------------------------------------------------------


def test_the_recorded_contexts_are_avl_evals_task_text():
    task = get_task("docvqa_val")
    for entry in recorded("generate_until", "avl_tiny_docvqa"):
        assert entry["context"] == task.text(docs()[entry["doc_id"]], "llava")


@pytest.mark.parametrize("model_args,policy,batch_size", [({}, avl.Full(), 1), (AVL_ARGS, AVL_POLICY, 1),
                                                          (AVL_ARGS, AVL_POLICY, 2)])
def test_generate_until_equals_avl_eval(checkpoint, data, tmp_path, model_args, policy, batch_size):
    entries = recorded("generate_until", "avl_tiny_docvqa")
    answers = adapter(checkpoint, batch_size=batch_size, **model_args).generate_until([request(e) for e in entries])
    evaluate(EvalConfig(model=str(checkpoint), task="docvqa_val", data=str(data), policy=policy, out=str(tmp_path),
                        batch_size=batch_size, progress=False,
                        max_new_tokens=entries[0]["generation_kwargs"]["max_new_tokens"]))
    records = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()[1:]]
    assert len(records) == N_DOCS and all(r["error"] is None for r in records)
    predictions = {r["index"]: r["prediction"] for r in records}
    assert answers == [predictions[e["doc_id"]] for e in entries]


def test_two_images_per_request_follow_lmms_evals_llava_prompt(checkpoint):
    entries = recorded("generate_until", "avl_tiny_two_images")
    answers = adapter(checkpoint, **AVL_ARGS).generate_until([request(e) for e in entries])
    processor = get_family("llava").load_processor(checkpoint)
    model = avl.load(checkpoint)
    eos = processor.tokenizer.eos_token_id
    for entry, answer in zip(entries, answers, strict=True):
        inputs = processor([llava_prompt(entry["context"], 2)], [two_images(docs()[entry["doc_id"]])])
        assert inputs["pixel_values"].shape[0] == 2
        out = avl.generate(model, **inputs, policy=AVL_POLICY, eos_token_id=eos, pad_token_id=processor.pad_token_id,
                           max_new_tokens=entry["generation_kwargs"]["max_new_tokens"])
        ids = out.tokens[0].tolist()
        assert answer == processor.decode(ids[:ids.index(eos)] if eos in ids else ids)


# what lmms-eval's wrappers build for two images (llava / llava_onevision: "<image> <image>\n" + text;
# llama_vision, qwen2_vl: one image part per image before the text; qwen_vl: from_list_format)
TWO_IMAGES = {
    "llava": llava_prompt("Q", 2),
    "llava_next": llava_prompt("Q", 2),
    "llava_onevision": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                       "<image> <image>\nQ<|im_end|>\n<|im_start|>assistant\n",
    "mllama": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|><|image|>Q<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "qwen": "Picture 1: <img></img>\nPicture 2: <img></img>\nQ",
    "qwen2_vl": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                + "<|vision_start|><|image_pad|><|vision_end|>" * 2 + "Q<|im_end|>\n<|im_start|>assistant\n",
}
TWO_IMAGES["qwen2_5_vl"] = TWO_IMAGES["qwen2_vl"]


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_prompts_for_one_and_two_images(model_type):
    family = FAMILIES[model_type]
    assert prompt_for(family, "Q", 1) == family.prompt("Q")
    assert prompt_for(family, "Q", 2) == TWO_IMAGES[model_type]


def test_image_counts_a_family_cannot_take_raise():
    llava = FAMILIES["llava"]
    with pytest.raises(ValueError, match="0 images; allowed: at least one"):
        prompt_for(llava, "Q", 0)
    other = dataclasses.replace(llava, model_type="other", eval_template=lambda text: f"<image>{text}")
    assert prompt_for(other, "Q", 1) == "<image>Q"
    with pytest.raises(ValueError, match="model_type 'other' has no multi-image prompt rule; allowed: 1 image"):
        prompt_for(other, "Q", 2)
    with pytest.raises(ValueError, match="holds '<image>\\\\n' 2 times"):
        prompt_for(llava, "<image>\nQ", 2)


def test_sampling_follows_the_tasks_temperature_and_top_p(checkpoint):
    entry = {**recorded("generate_until", "avl_tiny_docvqa")[0]}
    entry["generation_kwargs"] = {**entry["generation_kwargs"], "temperature": 0.7, "top_p": 0.9, "do_sample": True}
    answers = adapter(checkpoint, seed=5).generate_until([request(entry)] * 2)
    processor = get_family("llava").load_processor(checkpoint)
    inputs = processor([llava_prompt(entry["context"])], [one_image(docs()[entry["doc_id"]])])
    out = avl.generate(avl.load(checkpoint), **inputs, max_new_tokens=3, do_sample=True, temperature=0.7, top_p=0.9,
                       eos_token_id=processor.tokenizer.eos_token_id, generator=torch.Generator().manual_seed(5))
    assert answers[0] == processor.decode(out.tokens[0])  # the random tiny model ends nothing early in 3 tokens
    assert answers == adapter(checkpoint, seed=5).generate_until([request(entry)] * 2)  # the seed decides


def test_generation_kwargs():
    settings = GenerationSettings.from_kwargs({"until": "ASSISTANT:", "temperature": 0, "do_sample": False}, 1024)
    assert settings == GenerationSettings(1024, ("ASSISTANT:",), False, 1.0, 1.0)
    assert GenerationSettings.from_kwargs({"max_new_tokens": 16, "temperature": 0.2, "top_p": None}, 8) == \
        GenerationSettings(16, (), True, 0.2, 1.0)
    for kwargs, message in [({"num_beams": 2}, "num_beams=2 is not supported; allowed: 1"),
                            ({"repetition_penalty": 1.1}, r"\['repetition_penalty'\] are not supported"),
                            ({"until": 3}, "until=3 is invalid; allowed: a string or a list of strings")]:
        with pytest.raises(ValueError, match=message):
            GenerationSettings.from_kwargs(kwargs, 8)


def test_requests_the_adapter_cannot_serve_are_named(checkpoint):
    model = adapter(checkpoint)
    entry = recorded("generate_until", "avl_tiny_docvqa")[1]
    with pytest.raises(ValueError, match=r"request 0 \(task avl_tiny_docvqa, doc 1\): doc_to_visual gave a str"):
        model.generate_until([request(entry, lambda doc: ["clip.mp4"])])
    with pytest.raises(ValueError, match="a request has 0 images"):
        model.generate_until([request(entry, lambda doc: [])])
    with pytest.raises(ValueError, match="a loglikelihood request has 2 arguments"):
        model.loglikelihood([type("Bare", (), {"args": ("", " yes")})()])  # acc_mutual_info's unconditional one


# -- loglikelihood ----------------------------------------------------------------------------------


def test_loglikelihood_under_the_full_cache_equals_transformers(checkpoint):
    from transformers import LlavaForConditionalGeneration

    entries = recorded("loglikelihood", "avl_tiny_mc")
    answers = [unwrap(r) for r in adapter(checkpoint).loglikelihood([request(e) for e in entries])]
    hf = LlavaForConditionalGeneration.from_pretrained(checkpoint).eval()
    processor = get_family("llava").load_processor(checkpoint)
    lengths = set()
    for entry, (loss, greedy) in zip(entries, answers, strict=True):
        image = one_image(docs()[entry["doc_id"]])
        prompt = llava_prompt(entry["context"])
        expected_loss, expected_greedy = transformers_continuation_loss(hf, processor, prompt, entry["continuation"],
                                                                        image)
        assert loss == pytest.approx(expected_loss, abs=1e-4) and greedy == expected_greedy
        lengths.add(processor([prompt + entry["continuation"]], [image])["input_ids"].shape[1]
                    - processor([prompt], [image])["input_ids"].shape[1])
    assert max(lengths) >= 2  # continuations of several tokens: decode steps are compared too


def test_loglikelihood_under_a_policy_is_that_of_its_greedy_generation(checkpoint):
    """The continuation = the policy's own greedy answer: greedy, and its loss from generate's logits."""
    entry = {**recorded("generate_until", "avl_tiny_docvqa")[2], "type": "loglikelihood"}
    processor = get_family("llava").load_processor(checkpoint)
    prompt, image = llava_prompt(entry["context"]), one_image(docs()[entry["doc_id"]])
    inputs = processor([prompt], [image])
    out = avl.generate(avl.load(checkpoint), **inputs, policy=AVL_POLICY, max_new_tokens=4, output_logits=True)
    tokens = out.tokens[0]
    text = processor.decode(tokens)
    assert processor([prompt + text], [image])["input_ids"][0, inputs["input_ids"].shape[1]:].tolist() == \
        tokens.tolist()  # the text tokenizes back to the same 4 tokens (3 decode steps, one a core refresh)
    expected = -torch.log_softmax(out.logits[0].double(), -1).gather(-1, tokens[:, None]).mean()
    model = adapter(checkpoint, **AVL_ARGS)
    loss, greedy = unwrap(model.loglikelihood([request({**entry, "continuation": text})])[0])
    assert greedy and loss == pytest.approx(float(expected), abs=1e-5)
    assert not unwrap(model.loglikelihood([request({**entry, "continuation": text[:-1] + "x"})])[0])[1]

