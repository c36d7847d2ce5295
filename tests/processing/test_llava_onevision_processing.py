"""LLaVA-OneVision processing against transformers: the PIL image processor (pixels), the placeholder counts
and the processor outputs (tiny Qwen2 tokenizer), the Qwen2 tokenizer, and the chat template."""

from __future__ import annotations

import json
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from avl.processing.chat_template import read_chat_template, render_chat_template
from avl.processing.llava_onevision import (
    ONEVISION_CHAT_TEMPLATE,
    ONEVISION_GRID_PINPOINTS,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    onevision_num_image_tokens,
    onevision_prompt,
)
from avl.processing.tokenizer import Tokenizer
from avl.testing.qwen2_tokenizer import build_tiny_qwen2_tokenizer

TILE = 26
TINY_PINPOINTS = [[TILE * r, TILE * c] for r in range(1, 5) for c in range(1, 5)]
HUB_MEAN = [0.5, 0.5, 0.5]  # llava-hf/llava-onevision-qwen2-*-ov-hf normalise with 0.5 / 0.5
# chat_template.json of transformers' own LLaVA-OneVision processor tests: the llava-hf template without the
# newline after <|im_end|>; avl renders whichever template a checkpoint ships
TEMPLATE_WITHOUT_NEWLINE = ONEVISION_CHAT_TEMPLATE.replace("{{'<|im_end|>\\n'}}", "{{'<|im_end|>'}}")
# (width, height): square, wide, tall, very wide, very tall, one pixel, large (4 x 4 grid, downsampled)
IMAGE_SIZES = [(30, 30), (110, 40), (35, 120), (300, 20), (16, 400), (1, 1), (120, 110)]


@pytest.fixture(scope="session")
def qwen2_tok_dir(tmp_path_factory):
    return build_tiny_qwen2_tokenizer(tmp_path_factory.mktemp("tiny_qwen2"))


def hf_image_processor(tile: int = TILE, pinpoints=TINY_PINPOINTS, **kwargs):
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    return LlavaOnevisionImageProcessorPil(size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints,
                                           **kwargs)


def hf_processor(tok_dir, image_processor, num_image_tokens: int = 16, chat_template=None):
    """transformers' LlavaOnevisionProcessor without a video processor (its class check needs torchvision)."""
    from transformers import AutoTokenizer
    from transformers import LlavaOnevisionProcessor as HFProcessor
    from transformers.processing_utils import ProcessorMixin

    with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: None):
        return HFProcessor(image_processor=image_processor, tokenizer=AutoTokenizer.from_pretrained(tok_dir),
                           video_processor=None, num_image_tokens=num_image_tokens,
                           vision_feature_select_strategy="full", chat_template=chat_template)


def hf_call(processor, prompts, images):
    return processor(text=prompts, images=images, padding=True, padding_side="left", return_tensors="pt")


@pytest.fixture(scope="module")
def ours(qwen2_tok_dir) -> LlavaOnevisionProcessor:
    image_processor = LlavaOnevisionImageProcessor(image_grid_pinpoints=TINY_PINPOINTS, size=(TILE, TILE))
    return LlavaOnevisionProcessor(Tokenizer.from_dir(qwen2_tok_dir), image_processor, patch_size=6)


@pytest.fixture(scope="module")
def reference(qwen2_tok_dir):
    return hf_processor(qwen2_tok_dir, hf_image_processor())


@pytest.mark.parametrize("width,height", IMAGE_SIZES)
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "L"])
def test_image_processor_pixels_equal_transformers(make_image, width, height, mode):
    image = make_image(width, height, mode=mode, seed=width + height)
    ours = LlavaOnevisionImageProcessor(image_grid_pinpoints=TINY_PINPOINTS, size=(TILE, TILE))
    ref = hf_image_processor()(image, return_tensors="pt")
    out = ours(image)
    assert set(out) == set(ref) == {"pixel_values", "image_sizes", "batch_num_images"}
    for key in out:
        assert out[key].dtype == ref[key].dtype and torch.equal(out[key], ref[key]), key


@pytest.mark.parametrize("width,height", [(500, 330), (1200, 90), (70, 1300)])
def test_hub_sized_image_processor_pixels_equal_transformers(make_image, width, height):
    """384 px tiles, the 36 default grid resolutions, the hub's 0.5 / 0.5 normalisation."""
    image = make_image(width, height, seed=3)
    ours = LlavaOnevisionImageProcessor(image_mean=HUB_MEAN, image_std=HUB_MEAN)
    ref = hf_image_processor(384, [list(p) for p in ONEVISION_GRID_PINPOINTS], image_mean=HUB_MEAN,
                             image_std=HUB_MEAN)(image, return_tensors="pt")
    out = ours(image)
    assert out["pixel_values"].shape[-2:] == (384, 384)
    for key in out:
        assert torch.equal(out[key], ref[key]), key


def test_multi_image_groups_equal_transformers(make_image):
    """A nested list: the 2-image prompt's images become one square tile each (mean-colour padding)."""
    images = [[make_image(110, 40, seed=1), make_image(35, 120, mode="RGBA", seed=2)], [], [make_image(30, 30)]]
    ours = LlavaOnevisionImageProcessor(image_grid_pinpoints=TINY_PINPOINTS, size=(TILE, TILE))
    ref = hf_image_processor()(images, return_tensors="pt")
    out = ours(images)
    assert out["batch_num_images"].tolist() == [2, 1]
    for key in out:
        assert torch.equal(out[key], ref[key]), key


CASES = [  # prompts, images: a flat list (every image tiled) or one list per prompt (multi-image prompts)
    (["<image>What is it?"], [(30, 30)]),
    (["a <image> b <image> c", "only <image>"], [(110, 40), (35, 120), (300, 20)]),
    (["a <image> b <image> c", "only <image>"], [[(110, 40), (35, 120)], [(120, 110)]]),
    (["text first <image>\nünïcode 🙂", "no image at all"], [[(16, 400)], []]),
]


@pytest.mark.parametrize("prompts,sizes", CASES, ids=["one", "flat", "nested", "text-only-sample"])
def test_processor_outputs_equal_transformers(ours, reference, make_image, prompts, sizes):
    def image(size, seed):
        return make_image(*size, seed=seed)

    if isinstance(sizes[0], list):
        images = [[image(s, 10 * g + i) for i, s in enumerate(group)] for g, group in enumerate(sizes)]
    else:
        images = [image(s, i) for i, s in enumerate(sizes)]
    out, ref = ours(prompts, images), hf_call(reference, prompts, images)
    assert set(out) == set(ref) == {"input_ids", "attention_mask", "pixel_values", "image_sizes", "batch_num_images"}
    for key in out:
        assert torch.equal(out[key], ref[key]), key


def test_each_placeholder_gets_its_own_images_count(ours, make_image):
    """Flat list: the 110 x 40 image on a 2 x 4 grid (8 x 16 features, 6 x 16 unpadded): 16 + 6 x 17 = 118
    tokens; the 120 x 110 image on a 4 x 4 grid (16 x 16 features, 14 x 16 unpadded, above 9 tiles' worth:
    ratio sqrt(224 / 144), downsampled to 11 x 12): 16 + 11 x 13 = 159; in a multi-image prompt 16 + 1."""
    out = ours("a <image> b <image> c", [make_image(110, 40), make_image(120, 110)])
    ids, image = out["input_ids"][0].tolist(), ours.image_token_id
    first = ids.index(image)
    assert ids[first: first + 118] == [image] * 118 and ids[first + 118] != image
    second = ids.index(image, first + 118)
    assert ids[second: second + 159] == [image] * 159 and ids[second + 159] != image
    assert ours.num_image_tokens((40, 110)) == 118 and ours.num_image_tokens((110, 120)) == 159
    assert ours.num_image_tokens((40, 110), multi_image=True) == 17


HUB_SIZES = [(384, 384), (480, 640), (640, 480), (1080, 1920), (1920, 1080), (100, 4000), (4000, 100), (1, 1),
             (2304, 2304), (5000, 5000), (337, 1023), (768, 770)]


@pytest.mark.parametrize("size", HUB_SIZES)
def test_hub_counts_equal_transformers(qwen2_tok_dir, size):
    """384 px tiles, patch 14 (27 x 27 = 729 features a tile), 36 resolutions, anyres_max_9."""
    reference = hf_processor(qwen2_tok_dir, hf_image_processor(384, [list(p) for p in ONEVISION_GRID_PINPOINTS]),
                             num_image_tokens=729)
    ours = onevision_num_image_tokens(size, ONEVISION_GRID_PINPOINTS, 384, 14, 9, multi_image=False)
    assert ours == reference._get_number_of_features(*size, 384, 384)


@settings(max_examples=300, deadline=None)
@given(height=st.integers(1, 6000), width=st.integers(1, 6000), max_tiles=st.sampled_from([1, 4, 9, 16]))
def test_counts_equal_transformers_for_any_size(qwen2_tok_dir, height, width, max_tiles):
    reference = _count_reference(qwen2_tok_dir, f"anyres_max_{max_tiles}")
    ours = onevision_num_image_tokens((height, width), ONEVISION_GRID_PINPOINTS, 384, 14, max_tiles, False)
    assert ours == reference._get_number_of_features(height, width, 384, 384)


_COUNT_REFERENCES: dict[str, object] = {}


def _count_reference(tok_dir, aspect: str):
    if aspect not in _COUNT_REFERENCES:
        processor = hf_processor(tok_dir, hf_image_processor(384, [list(p) for p in ONEVISION_GRID_PINPOINTS]),
                                 num_image_tokens=729)
        processor.vision_aspect_ratio = aspect
        _COUNT_REFERENCES[aspect] = processor
    return _COUNT_REFERENCES[aspect]


@pytest.mark.parametrize("text", [
    "<|im_start|>user <image>\nWhat is shown in this image?<|im_end|>\n<|im_start|>assistant\n",
    "ünïcode 🙂  two  spaces\n\n\tnew lines 1234 it's <video> <|endoftext|>", "", " leading space",
])
def test_qwen2_tokenizer_equals_transformers(qwen2_tok_dir, text):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(qwen2_tok_dir)
    ours = Tokenizer.from_dir(qwen2_tok_dir)
    assert type(reference).__name__ == "Qwen2Tokenizer"
    assert ours.encode(text) == reference(text)["input_ids"]
    assert ours.decode(ours.encode(text), skip_special_tokens=False) == text
    assert (ours.eos_token, ours.pad_token_id) == ("<|im_end|>", reference.pad_token_id)


def _messages(question, n_images, system):
    user = {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": question}]}
    return ([{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []) + [user]


@pytest.mark.parametrize("template", [ONEVISION_CHAT_TEMPLATE, TEMPLATE_WITHOUT_NEWLINE], ids=["llava-hf", "no-nl"])
@pytest.mark.parametrize("question,n_images,system", [
    ("What is shown in this image?", 1, None), ("Compare them.", 2, None), ("Hi", 0, None),
    ("Describe.", 1, "You are a helpful assistant."),
])
def test_prompt_equals_transformers_apply_chat_template(qwen2_tok_dir, template, question, n_images, system):
    reference = hf_processor(qwen2_tok_dir, hf_image_processor(), chat_template=template)
    expected = reference.apply_chat_template(_messages(question, n_images, system), add_generation_prompt=True,
                                             tokenize=False)
    assert onevision_prompt(question, n_images, template=template, system=system) == expected


def test_prompt_examples_and_template_errors():
    assert onevision_prompt("What is this?") == (
        "<|im_start|>user <image>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="chat template failed: no system role"):
        render_chat_template("{{ raise_exception('no system role') }}", [])
    with pytest.raises(ValueError, match=r"n_images must be an int >= 0, got -1"):
        onevision_prompt("q", -1)


PREPROCESSOR_CONFIG = {  # the fields of llava-hf/llava-onevision-qwen2-0.5b-ov-hf's preprocessor_config.json, tiny
    "do_convert_rgb": True, "do_normalize": True, "do_pad": True, "do_rescale": True, "do_resize": True,
    "image_grid_pinpoints": TINY_PINPOINTS, "image_mean": HUB_MEAN, "image_std": HUB_MEAN,
    "image_processor_type": "LlavaOnevisionImageProcessor", "processor_class": "LlavaOnevisionProcessor",
    "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"height": TILE, "width": TILE},
}
PROCESSOR_CONFIG = {"image_token": "<image>", "num_image_tokens": 16, "processor_class": "LlavaOnevisionProcessor",
                    "video_token": "<video>", "vision_feature_select_strategy": "full",
                    "vision_aspect_ratio": "anyres_max_9"}


def write_checkpoint_dir(root, tok_dir, processor_config=PROCESSOR_CONFIG, config=None, template=None):
    root.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (root / name).write_bytes((tok_dir / name).read_bytes())
    (root / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG))
    if processor_config is not None:
        (root / "processor_config.json").write_text(json.dumps(processor_config))
    if config is not None:
        (root / "config.json").write_text(json.dumps(config))
    if template is not None:
        (root / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    return root


def test_from_dir_equals_transformers_with_the_same_files(tmp_path, qwen2_tok_dir, make_image):
    root = write_checkpoint_dir(tmp_path / "ckpt", qwen2_tok_dir, template=TEMPLATE_WITHOUT_NEWLINE)
    processor = LlavaOnevisionProcessor.from_dir(root)
    assert (processor.patch_size, processor.max_tiles, processor.chat_template) == (6, 9, TEMPLATE_WITHOUT_NEWLINE)
    assert read_chat_template(root) == TEMPLATE_WITHOUT_NEWLINE
    reference = hf_processor(qwen2_tok_dir, hf_image_processor(image_mean=HUB_MEAN, image_std=HUB_MEAN))
    prompts = [processor.prompt("Hi?"), processor.prompt("Wide?")]
    images = [make_image(120, 90, seed=1), make_image(400, 60, seed=2)]
    out, ref = processor(prompts, images), hf_call(reference, prompts, images)
    for key in ref:
        assert torch.equal(out[key], ref[key]), key


def test_from_dir_config_json_fallback_and_errors(tmp_path, qwen2_tok_dir):
    image_id = Tokenizer.from_dir(qwen2_tok_dir).token_to_id("<image>")
    config = {"image_token_index": image_id, "vision_config": {"patch_size": 6}}
    processor = LlavaOnevisionProcessor.from_dir(write_checkpoint_dir(tmp_path / "a", qwen2_tok_dir, None, config))
    assert (processor.patch_size, processor.chat_template) == (6, ONEVISION_CHAT_TEMPLATE)
    with pytest.raises(ValueError, match="cannot infer the patch size"):
        LlavaOnevisionProcessor.from_dir(write_checkpoint_dir(tmp_path / "b", qwen2_tok_dir, None))
    with pytest.raises(ValueError, match=r"vision_feature_select_strategy='default' in processor_config.json"):
        LlavaOnevisionProcessor.from_dir(write_checkpoint_dir(tmp_path / "c", qwen2_tok_dir, {
            **PROCESSOR_CONFIG, "vision_feature_select_strategy": "default"}))
    with pytest.raises(ValueError, match=r"num_image_tokens=15 in processor_config.json must be side\^2"):
        LlavaOnevisionProcessor.from_dir(write_checkpoint_dir(tmp_path / "d", qwen2_tok_dir, {
            **PROCESSOR_CONFIG, "num_image_tokens": 15}))
    with pytest.raises(ValueError, match=r"vision_aspect_ratio='anyres' is not supported"):
        LlavaOnevisionProcessor.from_dir(write_checkpoint_dir(tmp_path / "e", qwen2_tok_dir, {
            **PROCESSOR_CONFIG, "vision_aspect_ratio": "anyres"}))
    with pytest.raises(ValueError, match=r"image_token_index=7 but the tokenizer's '<image>' id is"):
        LlavaOnevisionProcessor.from_dir(write_checkpoint_dir(tmp_path / "f", qwen2_tok_dir, None,
                                                              {**config, "image_token_index": 7}))


def test_placeholder_errors(ours, make_image):
    with pytest.raises(ValueError, match=r"2 <image> placeholder\(s\).*1 image"):
        ours("<image><image> q", [make_image(30, 30)])
    with pytest.raises(ValueError, match=r"prompt 0 has 1 <image> placeholder\(s\) but 2 image\(s\)"):
        ours(["<image> q"], [[make_image(30, 30), make_image(30, 30)]])
    with pytest.raises(ValueError, match=r"patch_size=27 must be an int in \[1, tile size 26\]"):
        LlavaOnevisionProcessor(ours.tokenizer, ours.image_processor, patch_size=27)
