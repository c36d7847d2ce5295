"""LlavaProcessor against transformers' LlavaProcessor on the tiny tokenizer (the reference)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from avl.processing import ClipImageProcessor, LlavaProcessor, Tokenizer, llava15_prompt

PROCESSOR_CONFIG = {  # llava-hf/llava-1.5-7b-hf processor_config.json
    "image_token": "<image>",
    "num_additional_image_tokens": 1,
    "patch_size": 14,
    "processor_class": "LlavaProcessor",
    "vision_feature_select_strategy": "default",
}
PREPROCESSOR_CONFIG = {
    "crop_size": {"height": 336, "width": 336},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "CLIPImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "processor_class": "LlavaProcessor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 336},
}


def _hf_processor(tok_dir, crop: int, do_pad: bool = False, strategy: str = "default"):
    from transformers import AutoTokenizer
    from transformers import LlavaProcessor as HFLlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop}, do_pad=do_pad
    )
    return HFLlavaProcessor(
        image_processor=image_processor,
        tokenizer=AutoTokenizer.from_pretrained(tok_dir),
        patch_size=14,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1,
    )


def _hf_call(processor, prompts, images):
    return processor(text=prompts, images=images, padding=True, padding_side="left", return_tensors="pt")


@pytest.fixture(scope="module")
def ours_28(tiny_tok_dir) -> LlavaProcessor:
    tokenizer = Tokenizer.from_dir(tiny_tok_dir)
    return LlavaProcessor(tokenizer, ClipImageProcessor(size=28, crop_size=28), num_image_tokens=4)


@pytest.fixture(scope="module")
def hf_28(tiny_tok_dir):
    return _hf_processor(tiny_tok_dir, crop=28)


CASES = [
    ([llava15_prompt("What is it?")], 1),
    ([llava15_prompt("What is it?"), llava15_prompt("Compare these two pictures, in detail.", 2)], 3),
    (["<image>", "a much longer prompt with text before <image>\nand after it, ünïcode 🙂", "no image at all"], 2),
    (["USER: <image><image> ASSISTANT:", "  leading spaces <image>\n\nQ?"], 3),
]


@pytest.mark.parametrize("prompts,n_images", CASES)
def test_matches_transformers(ours_28, hf_28, make_image, prompts, n_images):
    images = [make_image(20 + 9 * i, 41 - 5 * i, mode="RGBA" if i % 2 else "RGB", seed=i) for i in range(n_images)]
    ours = ours_28(prompts, images)
    ref = _hf_call(hf_28, prompts, images)
    assert ours["input_ids"].dtype == torch.int64 and ours["attention_mask"].dtype == torch.int64
    assert torch.equal(ours["input_ids"], ref["input_ids"])
    assert torch.equal(ours["attention_mask"], ref["attention_mask"])
    assert torch.equal(ours["pixel_values"], ref["pixel_values"])
    assert ours["pixel_values"].shape == (n_images, 3, 28, 28)
    assert (ours["input_ids"] == 510).sum() == 4 * n_images


def test_text_only_matches_transformers(ours_28, hf_28):
    prompts = ["hello there", "a longer text-only prompt"]
    ours = ours_28(prompts)
    ref = hf_28(text=prompts, padding=True, padding_side="left", return_tensors="pt")
    assert set(ours) == {"input_ids", "attention_mask"}
    assert torch.equal(ours["input_ids"], ref["input_ids"])
    assert torch.equal(ours["attention_mask"], ref["attention_mask"])


@pytest.mark.parametrize("do_pad", [False, True])
def test_full_size_576_tokens_matches_transformers(tiny_tok_dir, make_image, do_pad):
    ours = LlavaProcessor(Tokenizer.from_dir(tiny_tok_dir), ClipImageProcessor(pad_to_square=do_pad))
    ref_proc = _hf_processor(tiny_tok_dir, crop=336, do_pad=do_pad)
    prompts = [llava15_prompt("What is shown?"), llava15_prompt("Why?")]
    images = [make_image(500, 333), make_image(37, 91, "P")]
    out, ref = ours(prompts, images), _hf_call(ref_proc, prompts, images)
    assert ours.num_image_tokens == 576
    for key in ("input_ids", "attention_mask", "pixel_values"):
        assert torch.equal(out[key], ref[key]), key
    assert (out["input_ids"][0] == 510).sum() == 576


def test_left_padding_layout(ours_28):
    out = ours_28(["<image>", "x y z <image> w"], [solid_image(), solid_image()])
    ids, mask = out["input_ids"], out["attention_mask"]
    n_pad = int((mask[0] == 0).sum())
    assert n_pad > 0 and torch.all(mask[0, :n_pad] == 0) and torch.all(mask[0, n_pad:] == 1)
    assert torch.all(ids[0, :n_pad] == 511) and ids[0, n_pad] == 1  # pads then <s>
    assert torch.all(mask[1] == 1)


def solid_image():
    from PIL import Image

    return Image.new("RGB", (30, 20), (10, 200, 30))


def test_nested_images_equal_flat(ours_28, make_image):
    prompts = [llava15_prompt("a", 2), llava15_prompt("b", 0), llava15_prompt("c", 1)]
    images = [make_image(30, 30, seed=i) for i in range(3)]
    flat = ours_28(prompts, images)
    nested = ours_28(prompts, [images[:2], [], images[2:]])
    for key in flat:
        assert torch.equal(flat[key], nested[key])


def test_image_paths_accepted(ours_28, tmp_path, make_image):
    image = make_image(33, 21)
    path = tmp_path / "im.png"
    image.save(path)
    a = ours_28("<image>", [path])
    b = ours_28("<image>", [image])
    assert torch.equal(a["pixel_values"], b["pixel_values"])


def test_placeholder_count_errors(ours_28):
    img = solid_image()
    with pytest.raises(ValueError, match=r"2 <image> placeholder\(s\).*1 image"):
        ours_28(llava15_prompt("q", 2), [img])
    with pytest.raises(ValueError, match=r"1 <image> placeholder\(s\).*3 image"):
        ours_28(llava15_prompt("q", 1), [img, img, img])
    with pytest.raises(ValueError, match=r"prompt 1 has 0 <image> placeholder\(s\) but 1 image"):
        ours_28(["<image>", "none"], [[img], [img]])
    with pytest.raises(ValueError, match=r"1 <image> placeholder\(s\).*no images"):
        ours_28("<image> q")
    with pytest.raises(ValueError, match="2 image lists for 1 prompts"):
        ours_28("<image>", [[img], [img]])
    with pytest.raises(ValueError, match=r"0 <image> placeholder\(s\).*1 image"):
        ours_28("no placeholder", [img])


def test_decode_matches_transformers(ours_28, hf_28):
    prompts = [llava15_prompt("What is it?"), "short"]
    images = [solid_image()]
    ours = ours_28(prompts, images)
    assert ours_28.batch_decode(ours["input_ids"]) == hf_28.batch_decode(ours["input_ids"], skip_special_tokens=True)
    assert ours_28.decode(ours["input_ids"][1]) == "short"


def _write_checkpoint_dir(root, tok_dir, *, processor_config=None, config=None, preprocessor=True):
    root.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tok_dir / name, root / name)
    if preprocessor:
        (root / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG))
    if processor_config is not None:
        (root / "processor_config.json").write_text(json.dumps(processor_config))
    if config is not None:
        (root / "config.json").write_text(json.dumps(config))
    return root


def test_from_dir_matches_transformers_auto_processor(tmp_path, tiny_tok_dir, make_image):
    from transformers import AutoProcessor

    root = _write_checkpoint_dir(tmp_path / "ckpt", tiny_tok_dir, processor_config=PROCESSOR_CONFIG)
    ours = LlavaProcessor.from_dir(root)
    assert ours.num_image_tokens == 576 and ours.image_token_id == 510 and ours.pad_token_id == 511
    ref = AutoProcessor.from_pretrained(root, backend="pil")
    prompts = [llava15_prompt("Hi?"), llava15_prompt("Two?", 2)]
    images = [make_image(64, 48, seed=i) for i in range(3)]
    out, expected = ours(prompts, images), _hf_call(ref, prompts, images)
    for key in ("input_ids", "attention_mask", "pixel_values"):
        assert torch.equal(out[key], expected[key]), key


def test_from_dir_config_json_fallback(tmp_path, tiny_tok_dir):
    config = {"image_token_index": 510, "vision_feature_select_strategy": "full", "vision_config": {"patch_size": 14}}
    root = _write_checkpoint_dir(tmp_path / "c", tiny_tok_dir, config=config, preprocessor=False)
    ours = LlavaProcessor.from_dir(root)
    assert ours.num_image_tokens == 24 * 24 + 1  # "full" keeps the CLS feature
    assert ours.image_processor == ClipImageProcessor()
    assert LlavaProcessor.from_dir(root, num_image_tokens=9).num_image_tokens == 9
    assert LlavaProcessor.from_dir(root, pad_to_square=True).image_processor.pad_to_square


def test_from_dir_errors(tmp_path, tiny_tok_dir):
    root = _write_checkpoint_dir(tmp_path / "none", tiny_tok_dir)
    with pytest.raises(ValueError, match="num_image_tokens"):
        LlavaProcessor.from_dir(root)
    bad = _write_checkpoint_dir(
        tmp_path / "bad", tiny_tok_dir, config={"image_token_index": 32000, "vision_config": {"patch_size": 14}}
    )
    with pytest.raises(ValueError, match="image_token_index=32000.*510"):
        LlavaProcessor.from_dir(bad)
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        LlavaProcessor.from_dir(tmp_path / "no_such_dir")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        LlavaProcessor.from_dir(empty, num_image_tokens=4)


def test_constructor_errors(tiny_tok_dir):
    tok = Tokenizer.from_dir(tiny_tok_dir)
    with pytest.raises(ValueError, match="num_image_tokens"):
        LlavaProcessor(tok, ClipImageProcessor(), num_image_tokens=0)
    with pytest.raises(ValueError, match="single id"):
        LlavaProcessor(tok, ClipImageProcessor(), image_token_id=7)
    with pytest.raises(ValueError, match="no '<img>' token"):
        LlavaProcessor(tok, ClipImageProcessor(), image_token="<img>")
    no_pad = LlavaProcessor(tok, ClipImageProcessor(size=28, crop_size=28), num_image_tokens=4)
    no_pad.pad_token_id = None
    with pytest.raises(ValueError, match="no pad token"):
        no_pad(["a", "a longer one"])
