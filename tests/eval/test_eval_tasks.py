"""Task definitions against lmms-eval v0.2.0: prompts, generation settings, post-processing, scoring,
and the sweep grid syntax. No model is loaded here."""

from __future__ import annotations

import pytest

from avl.cache.policies import AVL, FastV, Full, StreamingLLM
from avl.eval import TASKS, TaskError, get_family, get_task
from avl.eval.sweep import parse_grid, policy_label, policy_slug, sweep_policies, sweep_table

# The strings below are written out from lmms-eval v0.2.0 (task yaml + utils.py) and LLaVA's
# conv_vicuna_v1, which lmms-eval's `llava` model wrapper uses.
SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")
SHORT = "\nAnswer the question using a single word or phrase."
CAPTION = "Provide a one-sentence caption for the provided image."


def llava_prompt(text: str) -> str:
    return f"{SYSTEM} USER: <image>\n{text} ASSISTANT:"


@pytest.mark.parametrize("task,doc,expected", [
    ("docvqa_val", {"question": "What is the date mentioned in this letter?"},
     "What is the date mentioned in this letter?" + SHORT),
    # textvqa_doc_to_text capitalises the question: str.capitalize also lower-cases the rest
    ("textvqa_val", {"question": "what does the SIGN say?", "ocr_tokens": ["stop"]}, "What does the sign say?" + SHORT),
    ("vqav2_val", {"question": "What color is the bus?"}, "What color is the bus?" + SHORT),
    ("ocrbench", {"question": "  what is written in the image?\n"}, "what is written in the image?"),
    ("nocaps_val", {}, CAPTION),
    ("flickr30k_test", {}, CAPTION),
])
def test_llava_prompts_match_lmms_eval(task, doc, expected):
    family = get_family("llava")
    text = get_task(task).text(doc, family.lmms_eval_model)
    assert text == expected
    assert family.prompt(text) == llava_prompt(expected)


@pytest.mark.parametrize("task,expected", [
    ("docvqa_val", "What is the total? Answer:"),
    ("textvqa_val", "What is the total? Answer:"),
    ("vqav2_val", "What is the total?" + SHORT),  # vqav2 has no qwen_vl entry: lmms-eval falls back to default
])
def test_qwen_vl_prompts_match_lmms_eval(task, expected):
    family = get_family("qwen")
    text = get_task(task).text({"question": "What is the total?"}, family.lmms_eval_model)
    assert text == expected
    # lmms-eval writes the image path into the span; avl passes pixels, so the span stays empty
    assert family.prompt(text) == "Picture 1: <img></img>\n" + expected


def test_llava_onevision_prompt_matches_lmms_eval():
    """lmms-eval's llava_onevision wrapper: "<image>\n" + text through LLaVA-NeXT's conv_qwen (qwen_1_5), written
    out; the output is stripped and not cut at `until`."""
    family = get_family("llava_onevision")
    text = get_task("docvqa_val").text({"question": "What is the total?"}, family.lmms_eval_model)
    assert text == "What is the total?" + SHORT
    assert family.prompt(text) == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                                   "<image>\nWhat is the total?" + SHORT + "<|im_end|>\n<|im_start|>assistant\n")
    assert family.postprocess(" Stop ASSISTANT: x\n", ["ASSISTANT:"]) == "Stop ASSISTANT: x"


def test_textvqa_reference_ocr_tokens_when_asked():
    task = get_task("textvqa_val")
    text = task.doc_to_text({"question": "what brand?", "ocr_tokens": ["coca", "cola"]},
                            {"pre_prompt": "", "post_prompt": SHORT, "ocr": True})
    assert text == "What brand?\nReference OCR token: coca, cola" + SHORT


def test_generation_settings_and_sources():
    expected = {  # task: (max_new_tokens, hub dataset, config, split, primary metric)
        "docvqa_val": (32, "lmms-lab/DocVQA", "DocVQA", "validation", "nls_hit_rate"),
        "textvqa_val": (32, "lmms-lab/textvqa", None, "validation", "accuracy"),
        "ocrbench": (128, "echo840/OCRBench", None, "test", "accuracy"),
        "nocaps_val": (64, "lmms-lab/NoCaps", None, "validation", "cider"),
        "flickr30k_test": (64, "lmms-lab/flickr30k", None, "test", "cider"),
        "vqav2_val": (16, "lmms-lab/VQAv2", None, "validation", "accuracy"),
    }
    assert list(TASKS) == list(expected)
    for name, (tokens, dataset, config, split, primary) in expected.items():
        task = TASKS[name]
        assert (task.max_new_tokens, task.dataset, task.config, task.split, task.primary) == \
            (tokens, dataset, config, split, primary)


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(TaskError, match="unknown task 'docvqa'.*docvqa_val, textvqa_val, ocrbench, nocaps_val"):
        get_task("docvqa")


def test_output_postprocessing_per_family():
    until = get_task("textvqa_val").until
    assert until == ("ASSISTANT:",)
    assert get_family("llava").postprocess(" Stop ASSISTANT: x", until) == " Stop ASSISTANT: x"  # llava wrapper: as is
    assert get_family("qwen").postprocess(" Stop ASSISTANT: x", until) == "Stop "
    with pytest.raises(ValueError, match="model_type='blip-2', which avl does not support .*evaluation prompts"):
        get_family("blip-2")


def test_per_sample_scores_use_the_lmms_eval_rules():
    docvqa, vqav2, ocr = get_task("docvqa_val"), get_task("vqav2_val"), get_task("ocrbench")
    target = docvqa.target({"answers": ["1/8/93", "January 8, 1993"]})
    assert docvqa.score("  1/8/93\n", target)["nls_hit"] == 1.0
    assert docvqa.score("1/8/9", target) == pytest.approx({"nls_hit": 1.0, "anls": 1 - 1 / 6})
    # VQAv2 answers are {answer, answer_confidence, answer_id} structs
    structs = [{"answer": "yes", "answer_confidence": "yes", "answer_id": k} for k in range(10)]
    target = vqav2.target({"answers": structs})
    assert vqav2.score("Yes", target) == {"accuracy": 1.0, "accuracy_official": 0.0}
    target = ocr.target({"answer": ["\\Delta x"], "dataset": "HME100k",
                         "question_type": "Handwritten Mathematical Expression Recognition"})
    assert ocr.score("it is \\Delta x", target) == {"correct": 0.0, "correct_official": 1.0}
    with pytest.raises(TaskError, match="unknown OCRBench question_type 'Poetry'"):
        ocr.target({"answer": ["a"], "dataset": "x", "question_type": "Poetry"})
    with pytest.raises(TaskError, match="'answers' is empty"):
        docvqa.target({"answers": []})


def test_corpus_metrics_aggregate_over_all_records():
    task = get_task("flickr30k_test")
    records = [{"index": i, "prediction": p, "target": {"references": refs}} for i, (p, refs) in enumerate([
        ("A dog runs on the grass.", ["A dog running on grass.", "A brown dog runs across a lawn."]),
        ("Two men sit at a table.", ["Two men sitting at a table.", "Men at a wooden table."]),
        ("A red bus on a street.", ["A red bus drives down the street.", "A bus on a city street."]),
    ])]
    cider = task.aggregate(records, {})["cider"]
    assert cider > 0.5
    assert task.aggregate(records[:1], {})["cider"] == 0.0  # one image: every idf is 0 (pycocoevalcap too)


def test_grid_is_a_cartesian_product_and_skips_invalid_combinations():
    policies, skipped = parse_grid("secondary=0.3,0.5 core=0.1,0.4 refresh_every=3 prefill_keep=0.9 text_keep=0.5,1.0")
    assert len(policies) == 6 and len(skipped) == 2  # core=0.4 > secondary=0.3 is rejected by AVL
    assert AVL(0.5, 0.4, 3, 0.9, 1.0) in policies
    assert all("core=0.4 exceeds secondary=0.3" in note for note in skipped)
    assert parse_grid("fastv: keep=0.25,0.5")[0] == [FastV(keep=0.25), FastV(keep=0.5)]
    assert parse_grid("full")[0] == [Full()]
    assert parse_grid("streaming: window=8 positions=shifted,original")[0] == [
        StreamingLLM(window=8), StreamingLLM(window=8, positions="original")]
    policies, _ = sweep_policies(["secondary=0.5", "full"], baselines=True)
    assert [policy_slug(p) for p in policies] == ["avl-secondary0.5", "full", "fastv-layer2-keep0.5",
                                                  "h2o-budget0.5-heavy_share0.25",
                                                  "streaming-sinks4-window256-positionsshifted"]
    assert policy_label(FastV(keep=0.25)) == "fastv layer=2 keep=0.25"
    assert policy_label(AVL(0.5, 0.25, 3)) == "avl secondary=0.5 core=0.25 refresh_every=3"
    with pytest.raises(ValueError, match="fastv has no field 'secondary'; its fields: layer, keep"):
        parse_grid("fastv: secondary=0.5")
    with pytest.raises(ValueError, match="unknown policy 'snapkvv'"):
        parse_grid("snapkvv: budget=0.5")
    with pytest.raises(ValueError, match="the sweep has no valid policy"):
        sweep_policies(["secondary=0.1 core=0.5 refresh_every=2"], baselines=False)


def test_sweep_table_markdown_and_csv():
    rows = [{"policy": "full", "family": "full", "metric": "accuracy", "score": 0.5, "stored_pct": 100.0,
             "stored_mb": 2.5, "used_pct": 100.0, "used_mb": 2.5, "samples": 3, "failed": 0, "generation_s": 1.0,
             "out": "x"}]
    markdown, table_csv = sweep_table(rows)
    assert markdown.splitlines()[0].startswith("| policy | family | metric | score | stored_pct")
    assert "| full | full | accuracy | 0.5000 | 100.0 |" in markdown
    assert table_csv.splitlines()[1].startswith("full,full,accuracy,0.5,100.0")
