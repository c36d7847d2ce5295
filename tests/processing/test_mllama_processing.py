"""Llama-3.2-Vision preprocessing against transformers' MllamaImageProcessor (PIL backend) and the
processor's cross-attention-mask rule; the chat template; the processor end to end."""

from __future__ import annotations

import pytest
import torch
from tokenizers import AddedToken

from avl.processing import Tokenizer
from avl.processing.mllama import (
    MllamaImageProcessor,
    MllamaProcessor,
    choose_canvas,
    cross_attention_mask,
    fit_to_canvas,
    mllama_chat_prompt,
    mllama_prompt,
)

SIZES = [(56, 56), (30, 100), (200, 40), (120, 120), (57, 113), (300, 20), (10, 10), (90, 60), (1, 400), (112, 56),
         (168, 50)]  # (width, height): 1 to 4 tiles, up- and downscaled


def hf_processor(ours: MllamaImageProcessor):
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    return MllamaImageProcessorPil(size={"height": ours.tile_size, "width": ours.tile_size},
                                   max_image_tiles=ours.max_image_tiles, image_mean=list(ours.image_mean),
                                   image_std=list(ours.image_std), resample=ours.resample)


def assert_same(ours, ref) -> None:
    assert ours.pixel_values.dtype == ref["pixel_values"].dtype == torch.float32
    assert torch.equal(ours.pixel_values, ref["pixel_values"])
    assert torch.equal(ours.aspect_ratio_ids, ref["aspect_ratio_ids"])
    assert torch.equal(ours.aspect_ratio_mask, ref["aspect_ratio_mask"])
    assert ours.num_tiles == ref["num_tiles"]


def test_tiles_equal_transformers_for_many_sizes_and_modes(make_image):
    ours = MllamaImageProcessor(tile_size=56)
    images = [[make_image(w, h, seed=i)] for i, (w, h) in enumerate(SIZES)]
    images += [[make_image(80, 40, "RGBA", 1), make_image(33, 77, "L", 2)], [make_image(60, 61, "P", 3)]]
    out = ours(images)
    assert out.pixel_values.shape == (len(images), 2, 4, 3, 56, 56)
    assert sorted({n for sample in out.num_tiles for n in sample}) == [1, 2, 3, 4]
    assert_same(out, hf_processor(ours)(images, return_tensors="pt"))


def test_hub_preprocessor_config_at_full_size(make_image):
    hub = {"do_convert_rgb": True, "do_normalize": True, "do_pad": True, "do_rescale": True, "do_resize": True,
           "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
           "image_processor_type": "MllamaImageProcessor", "max_image_tiles": 4, "resample": 2,
           "rescale_factor": 0.00392156862745098, "size": {"height": 560, "width": 560}}
    ours = MllamaImageProcessor.from_preprocessor_config(hub)
    assert (ours.tile_size, ours.max_image_tiles, ours.resample) == (560, 4, 2)
    images = [[make_image(640, 480, seed=5)], [make_image(300, 900, seed=6)]]
    assert_same(ours(images), hf_processor(ours)(images, return_tensors="pt"))
    with pytest.raises(ValueError, match="do_pad=False is not supported"):
        MllamaImageProcessor.from_preprocessor_config({**hub, "do_pad": False})


def test_canvas_choice_and_fit_equal_transformers():
    from transformers.models.mllama.image_processing_pil_mllama import (
        get_image_size_fit_to_canvas,
        get_optimal_tiled_canvas,
    )

    tile = 56
    for max_tiles in (1, 2, 4, 6):
        for h in (1, 20, 55, 56, 57, 100, 111, 112, 113, 170, 250, 400):
            for w in (1, 30, 56, 90, 112, 168, 224, 300):
                rows, cols = choose_canvas(h, w, max_tiles, tile)
                canvas = get_optimal_tiled_canvas(h, w, max_tiles, tile)
                assert (rows * tile, cols * tile) == tuple(int(x) for x in canvas)
                assert fit_to_canvas(h, w, rows * tile, cols * tile, tile) == tuple(
                    int(x) for x in get_image_size_fit_to_canvas(h, w, rows * tile, cols * tile, tile))


@pytest.mark.parametrize("row", [
    [1, 9, 300, 5, 6],
    [300, 1, 5, 6, 7],
    [1, 300, 4, 300, 5, 6],
    [1, 300, 300, 4, 5, 300, 6],
    [1, 300, 300, 300],
    [7, 1, 2, 300],
])
def test_cross_attention_mask_equals_the_processors_rule(row):
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense,
        get_cross_attention_token_mask,
    )

    tiles = [[(i % 4) + 1 for i in range(row.count(300))]]
    ref = convert_sparse_cross_attention_mask_to_dense([get_cross_attention_token_mask(row, 300)], tiles, 4, len(row))
    assert torch.equal(cross_attention_mask([row], 300, tiles, 4), torch.from_numpy(ref))


def test_cross_attention_mask_of_a_left_padded_batch_shifts_each_row():
    rows = [[0, 0, 1, 300, 5], [1, 2, 300, 5, 6]]
    mask = cross_attention_mask(rows, 300, [[2], [4]], 4)
    assert mask.shape == (2, 5, 1, 4)
    assert mask[0, :, 0].tolist() == [[0] * 4] * 3 + [[1, 1, 0, 0]] * 2
    assert mask[1, :, 0].tolist() == [[0] * 4] * 2 + [[1] * 4] * 3
    with pytest.raises(ValueError, match="sample 0 has 1 <\\|image\\|> token\\(s\\) but 2 image\\(s\\)"):
        cross_attention_mask([[1, 300]], 300, [[1, 1]], 4)


def test_chat_template():
    image_turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    expected = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>What is this?<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert mllama_chat_prompt(image_turn) == expected == mllama_prompt("What is this?")
    text_only = mllama_chat_prompt([{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Hi"},
                                    {"role": "assistant", "content": "Hello"}], add_generation_prompt=False)
    assert text_only == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
                         "December 2023\nToday Date: 26 Jul 2024\n\nBe brief.<|eot_id|><|start_header_id|>user"
                         "<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
                         "Hello<|eot_id|>")
    with pytest.raises(ValueError, match="incompatible with system messages"):
        mllama_chat_prompt([{"role": "system", "content": "x"}, *image_turn])


@pytest.fixture
def processor(tiny_tok_dir):
    tokenizer = Tokenizer.from_dir(tiny_tok_dir)
    tokenizer.backend.add_special_tokens([AddedToken("<|image|>", special=True, normalized=False)])
    return MllamaProcessor(tokenizer, MllamaImageProcessor(tile_size=56))  # the tokenizer's BOS, <s>


def test_processor_gives_every_model_input(processor, make_image):
    image_id, bos = processor.image_token_id, processor.tokenizer.bos_token_id
    out = processor(["<|image|>What is shown in this image?", "A picture <|image|> of a dog"],
                    [make_image(200, 40, seed=1), make_image(50, 50, seed=2)])
    ids, mask = out["input_ids"], out["attention_mask"]
    rows = [r[m.bool()].tolist() for r, m in zip(ids, mask)]
    assert rows[0][:2] == [image_id, bos] and rows[1][0] == bos  # one BOS, after leading image tokens
    assert [r.count(bos) for r in rows] == [1, 1]
    assert (mask[:, -1] == 1).all() and mask[1].sum() < mask.shape[1]  # left padding
    assert out["pixel_values"].shape == (2, 1, 4, 3, 56, 56)
    assert sorted(out) == ["aspect_ratio_ids", "aspect_ratio_mask", "attention_mask", "cross_attention_mask",
                           "input_ids", "pixel_values"]  # exactly the model's inputs
    assert out["aspect_ratio_mask"].sum(-1).tolist() == [[4], [1]]
    assert torch.equal(out["cross_attention_mask"], cross_attention_mask(ids.tolist(), image_id, [[4], [1]], 4))
    with pytest.raises(ValueError, match="\\[1, 0\\] <\\|image\\|> token\\(s\\) but 2 image\\(s\\)"):
        processor(["<|image|>x", "y"], [make_image(20, 20), make_image(20, 20)])
