"""`avl.analyze` against an independent computation from transformers' eager attentions.

The reference runs transformers' own model (eager attention, float64, `output_attentions=True`) once
over the prompt and the generated tokens, takes A[t, l] = the head mean of row L - 1 + t over rows
0 .. L + t - 1, and computes every quantity of the report from it in plain Python; modalities come
from the input ids (image token), not from avl's layout. transformers' eager attention takes its softmax in float32 even for a float64
model, so its probabilities carry float32 rounding (a few 1e-8): the tolerance is 1e-6.

Llama-3.2-Vision: A_x[t, l] = the head mean of row L - 1 + t of cross-attention layer l's attention
over all feature rows, its image rows the feature rows that the last prompt row's
`cross_attention_mask` marks (per tile, times the patches per tile).
"""

from __future__ import annotations

import math

import pytest
import torch

import avl
from avl.analysis import AttentionRecorder, AttentionReport, analyze, observing
from tiny_llava import (
    IMAGE_TOKEN,
    PAD_TOKEN,
    build_tiny_mllama_checkpoint,
    build_tiny_onevision_checkpoint,
    prompt_ids,
    save_hf_llava,
)

STEPS = 10
TOL = 1e-6


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add overhead
    yield
    torch.set_num_threads(threads)


def eager(cls, directory):
    return cls.from_pretrained(directory, attn_implementation="eager", dtype=torch.float64).eval()


def reference_attention(hf, ids: torch.Tensor, tokens: list[int], cross_layers: list[int] | None = None,
                        sequence_inputs=None, **image) -> list[list[list[float]]]:
    """A[t][l] (lists of floats) from transformers' eager attentions over prompt + generated tokens.

    Every layer's row L - 1 + t over rows 0 .. L + t - 1; with `cross_layers`, those layers' rows
    L - 1 + t over all their keys (the image features). `sequence_inputs(sequence)`: the inputs that
    follow the sequence (Qwen2-VL's token types, Mllama's cross-attention mask).
    """
    sequence = torch.cat([ids, torch.tensor([tokens[:-1]])], dim=1)
    extra = {} if sequence_inputs is None else sequence_inputs(sequence)
    with torch.no_grad():
        out = hf(input_ids=sequence, attention_mask=torch.ones_like(sequence), output_attentions=True, **image,
                 **extra)
    prompt = ids.shape[1]
    if cross_layers is not None:
        return [[out.attentions[layer][0, :, prompt - 1 + t].mean(0).tolist() for layer in cross_layers]
                for t in range(len(tokens))]
    return [[layer[0, :, prompt - 1 + t, :prompt + t].mean(0).tolist() for layer in out.attentions]
            for t in range(len(tokens))]


def widened(cls, directory, seed: int):
    """Redraw the weights of the checkpoint in `directory` wider than transformers' tiny init (every
    gate open), save them there and return the eager float64 model: attention rows far from uniform,
    so a wrong row, mask or position moves the quantities beyond the tolerance."""
    built = cls.from_pretrained(directory, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in built.named_parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=p.dtype)
            if "gate" in name:
                p.copy_(0.3 + 0.9 * torch.rand(p.shape, generator=generator, dtype=p.dtype))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(noise * (1.0 if "image_newline" in name else 0.15 if p.dim() > 1 else 0.1))
    built.save_pretrained(directory)
    return eager(cls, directory)


def text_ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 290, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def reference_report(attention: list[list[list[float]]], ids: list[int], top: float, mass: float,
                     image_token: int = IMAGE_TOKEN) -> dict:
    """Every quantity of the report, by the issue's definitions, in plain Python."""
    image = [i for i, token in enumerate(ids) if token == image_token]
    rows = {"system": range(image[0]), "image": image,
            "instruction": [i for i in range(image[0], len(ids)) if i not in image]}
    shares = []
    for t, layers in enumerate(attention):
        rows["generated"] = range(len(ids), len(ids) + t)
        shares.append({name: sum(sum(a[i] for i in r) for a in layers) / len(layers) for name, r in rows.items()})
    return {"modal_shares": shares, **reference_image_quantities(attention, image, top, mass)}


def reference_image_quantities(attention: list[list[list[float]]], image: list[int], top: float, mass: float) -> dict:
    """Concentration and PPCI of the rows `image` of A[t][l], in plain Python."""
    concentration = []
    for layers in attention:
        per_layer = []
        for a in layers:
            values = sorted((a[i] for i in image), reverse=True)
            k, held = 0, 0.0
            while held < mass * sum(values):
                held += values[k]
                k += 1
            per_layer.append(max(k, 1) / len(image))
        concentration.append(per_layer)
    k_top = max(1, math.floor(top * len(image)))

    def top_set(t: int, layer: int) -> set[int]:
        a = attention[t][layer]
        return set(sorted(image, key=lambda i: (-a[i], i))[:k_top])

    n_layers = len(attention[0])
    return {
        "concentration": concentration,
        "ppci_layers": [len(top_set(0, 0) & top_set(0, layer)) / k_top for layer in range(n_layers)],
        "ppci_steps": [[len(top_set(0, layer) & top_set(t, layer)) / k_top for t in range(len(attention))]
                       for layer in range(n_layers)],
    }


def assert_report_matches(report: AttentionReport, expected: dict) -> None:
    if expected.get("modal_shares") is None:
        assert report.modal_shares is None and report.steps == STEPS
    else:
        assert len(report.modal_shares) == len(expected["modal_shares"]) == STEPS
        for ours, ref in zip(report.modal_shares, expected["modal_shares"]):
            assert ours.keys() == ref.keys()
            assert max(abs(ours[m] - ref[m]) for m in ref) <= TOL
    for name in ("concentration", "ppci_steps"):
        ours, ref = torch.tensor(getattr(report, name)), torch.tensor(expected[name])
        assert ours.shape == ref.shape and (ours - ref).abs().max() <= TOL, name
    assert (torch.tensor(report.ppci_layers) - torch.tensor(expected["ppci_layers"])).abs().max() <= TOL


def assert_invariants(report: AttentionReport) -> None:
    for shares in report.modal_shares or []:
        assert abs(sum(shares.values()) - 1.0) <= 1e-9
    assert report.ppci_layers[0] == 1.0 and all(row[0] == 1.0 for row in report.ppci_steps)
    assert all(0.0 < c <= 1.0 for row in report.concentration for c in row)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    from transformers import LlavaForConditionalGeneration

    directory = tmp_path_factory.mktemp("llava")
    save_hf_llava(directory, seed=2, num_key_value_heads=2)  # GQA: the head mean is over the query heads
    return avl.load(directory), eager(LlavaForConditionalGeneration, directory)


@pytest.mark.parametrize("top,mass", [(0.3, 0.8), (0.5, 0.5)])
def test_llava_report_equals_transformers_eager_attentions(llava, top, mass):
    model, hf = llava
    ids = torch.tensor([prompt_ids(4, 6, 16, seed=7)])
    pixels = torch.randn(1, 3, 48, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    report = analyze(model, ids, pixel_values=pixels, max_new_tokens=STEPS, top=top, mass=mass)
    reference_tokens = hf.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=STEPS, min_new_tokens=STEPS,
                                   do_sample=False)[0, ids.shape[1]:].tolist()
    assert report.tokens == reference_tokens and len(set(report.tokens)) > 2
    attention = reference_attention(hf, ids, report.tokens, pixel_values=pixels)
    assert_report_matches(report, reference_report(attention, ids[0].tolist(), top, mass))
    assert_invariants(report)
    assert (report.n_image, report.top, report.mass, report.steps, report.layers) == (16, top, mass, STEPS, 3)


def test_recorded_attention_rows_equal_transformers(llava):
    """A[t, l] row by row: the slots of the full cache mapped back to sequence rows."""
    model, hf = llava
    ids = torch.tensor([prompt_ids(2, 5, 16, seed=3)])
    pixels = torch.randn(1, 3, 48, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    recorder = AttentionRecorder()
    with observing(model, recorder):
        observed = avl.generate(model, ids, pixel_values=pixels, max_new_tokens=STEPS, output_logits=True)
    assert model.language_model.observer is None  # unset again after the block
    plain = avl.generate(model, ids, pixel_values=pixels, max_new_tokens=STEPS, output_logits=True)
    assert torch.equal(observed.logits, plain.logits)  # observing changes nothing
    tokens = observed.tokens[0].tolist()
    reference = reference_attention(hf, ids, tokens, pixel_values=pixels)
    recorded = recorder.steps()
    assert len(recorded) == STEPS
    for t, (ours, ref) in enumerate(zip(recorded, reference)):
        assert ours.shape == (3, ids.shape[1] + t)
        assert (ours - torch.tensor(ref, dtype=torch.float64)).abs().max() <= TOL


def test_nested_observing_restores_the_outer_observer(llava):
    model, _ = llava
    outer, inner = AttentionRecorder(), AttentionRecorder()
    with observing(model, outer):
        with observing(model, inner):
            assert model.language_model.observer is inner
        assert model.language_model.observer is outer
    assert model.language_model.observer is None


def test_llava_next_report_equals_transformers_eager_attentions(tmp_path):
    """Anyres tiles and newline features in the image rows; a Mistral-style GQA text model."""
    from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration, MistralConfig

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=24, patch_size=6, projection_dim=32)
    text = MistralConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, sliding_window=4096,
                         max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_grid_pinpoints=[[24, 48], [48, 24]],
                             image_token_index=IMAGE_TOKEN, pad_token_id=PAD_TOKEN, vision_feature_layer=-2)
    torch.manual_seed(0)
    built = LlavaNextForConditionalGeneration(config).to(torch.float64)
    with torch.no_grad():
        for p in built.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
        built.model.image_newline.normal_(0, 1.0)
    built.save_pretrained(tmp_path)
    model, hf = avl.load(tmp_path), eager(LlavaNextForConditionalGeneration, tmp_path)
    size = (20, 40)  # 2:1 -> a 1x2 grid
    image = {"pixel_values": torch.randn(1, 3, 3, 24, 24, dtype=torch.float64,
                                         generator=torch.Generator().manual_seed(5)),
             "image_sizes": torch.tensor([size])}
    ids = torch.tensor([prompt_ids(3, 5, model.num_image_tokens(size), seed=5)])
    report = analyze(model, ids, max_new_tokens=STEPS, **image)
    attention = reference_attention(hf, ids, report.tokens, **image)
    assert_report_matches(report, reference_report(attention, ids[0].tolist(), 0.3, 0.8))
    assert_invariants(report)
    assert report.n_image == model.num_image_tokens(size) == 52


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen2_vl_report_equals_transformers_eager_attentions(family, tmp_path):
    """M-RoPE positions; image rows are the <|image_pad|> rows, the vision start / end tokens around
    them are text rows (system before the image, instruction after it). Qwen2.5-VL: windowed vision."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    from tiny_qwen2_vl import IMAGE_ID, VISION_END, VISION_START, build_hf, image_prompt, random_pixels

    build_hf(tmp_path, family, seed=3)
    cls = Qwen2VLForConditionalGeneration if family == "qwen2_vl" else Qwen2_5_VLForConditionalGeneration
    model, hf = avl.load(tmp_path), eager(cls, tmp_path)
    grid = torch.tensor([[1, 8, 8]])  # 16 image tokens after the 2 x 2 merge
    ids = torch.tensor([image_prompt(text_ids(3, 4), grid.tolist(), text_ids(6, 5))])
    image = {"pixel_values": random_pixels(grid, seed=4), "image_grid_thw": grid}
    report = analyze(model, ids, max_new_tokens=STEPS, **image)

    def token_types(sequence):
        return {"mm_token_type_ids": (sequence == IMAGE_ID).int()}

    reference_tokens = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **image, **token_types(ids),
                                   max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False)[0, ids.shape[1]:]
    assert report.tokens == reference_tokens.tolist() and len(set(report.tokens)) > 2
    attention = reference_attention(hf, ids, report.tokens, sequence_inputs=token_types, **image)
    expected = reference_report(attention, ids[0].tolist(), 0.3, 0.8, image_token=IMAGE_ID)
    assert_report_matches(report, expected)
    assert_invariants(report)
    assert ids[0, 3] == VISION_START and ids[0, 20] == VISION_END  # text rows around the 16 image rows
    assert (report.n_image, report.layers, report.attention, report.decoder_layers) == (16, 2, "self", [0, 1])


def test_llava_onevision_report_equals_transformers_eager_attentions(tmp_path):
    """AnyRes tiles, newline features among the image rows, a Qwen2 GQA text model."""
    from transformers import LlavaOnevisionForConditionalGeneration

    directory = build_tiny_onevision_checkpoint(tmp_path)
    hf = widened(LlavaOnevisionForConditionalGeneration, directory, seed=6)
    model = avl.load(directory)
    size = (20, 45)  # 1 x 2 grid of 26 px tiles
    image_id = hf.config.image_token_index
    ids = torch.tensor([[*text_ids(4, 6), *[image_id] * model.num_image_tokens(size), *text_ids(5, 7)]])
    image = {"pixel_values": torch.randn(1, 5, 3, 26, 26, dtype=torch.float64,
                                         generator=torch.Generator().manual_seed(6)),
             "image_sizes": torch.tensor([size])}
    report = analyze(model, ids, max_new_tokens=STEPS, **image)
    reference_tokens = hf.generate(input_ids=ids, **image, max_new_tokens=STEPS, min_new_tokens=STEPS,
                                   do_sample=False)[0, ids.shape[1]:]
    assert report.tokens == reference_tokens.tolist() and len(set(report.tokens)) > 2
    attention = reference_attention(hf, ids, report.tokens, **image)
    assert_report_matches(report, reference_report(attention, ids[0].tolist(), 0.3, 0.8, image_token=image_id))
    assert_invariants(report)
    assert report.n_image == model.num_image_tokens(size) and report.layers == 3


MLLAMA_TILES = 3  # aspect-ratio id 3: a 1 x 3 layout, so the 4th of max_num_tiles=4 is a padding tile


@pytest.fixture(scope="module")
def mllama(tmp_path_factory):
    """(avl model, transformers eager model, inputs as MllamaProcessor gives them) of a tiny Llama-3.2-Vision."""
    from transformers import MllamaForConditionalGeneration

    directory = build_tiny_mllama_checkpoint(tmp_path_factory.mktemp("mllama"))
    hf = widened(MllamaForConditionalGeneration, directory, seed=8)
    ids = torch.tensor([[1, *text_ids(3, 8), hf.config.image_token_index, *text_ids(11, 9)]])
    mask = torch.zeros(1, ids.shape[1], 1, 4, dtype=torch.long)
    mask[:, 4:, :, :MLLAMA_TILES] = 1  # rows from the <|image|> token on attend the image's real tiles
    tile_mask = torch.zeros(1, 1, 4, dtype=torch.long)
    tile_mask[..., :MLLAMA_TILES] = 1
    pixels = torch.zeros(1, 1, 4, 3, 28, 28, dtype=torch.float64)
    pixels[:, :, :MLLAMA_TILES] = torch.randn(1, 1, MLLAMA_TILES, 3, 28, 28, dtype=torch.float64,
                                              generator=torch.Generator().manual_seed(8))
    inputs = {"input_ids": ids, "pixel_values": pixels, "aspect_ratio_ids": torch.tensor([[3]]),
              "aspect_ratio_mask": tile_mask, "cross_attention_mask": mask}
    return avl.load(directory), hf, inputs


def mllama_reference(hf, inputs: dict, tokens: list[int]) -> tuple[list[list[list[float]]], list[int]]:
    """A_x[t][l] over every feature row of the cross-attention layers, from transformers' eager
    attentions (decode rows take the last prompt row's mask, as its `generate` does), and the image
    rows: the feature rows of the tiles the last prompt row's cross_attention_mask marks."""
    vision = hf.config.vision_config
    per_tile = (vision.image_size // vision.patch_size) ** 2 + 1  # patches + the class token
    mask = inputs["cross_attention_mask"]

    def extended_mask(sequence):
        grown = sequence.shape[1] - mask.shape[1]
        return {"cross_attention_mask": torch.cat([mask, mask[:, -1:].expand(-1, grown, -1, -1)], dim=1)}

    image = {k: v for k, v in inputs.items() if k not in ("input_ids", "cross_attention_mask")}
    attention = reference_attention(hf, inputs["input_ids"], tokens, hf.config.text_config.cross_attention_layers,
                                    extended_mask, **image)
    marked = mask[0, -1].flatten().tolist()  # [images * tiles]
    rows = [tile * per_tile + p for tile, on in enumerate(marked) if on for p in range(per_tile)]
    return attention, rows


def test_mllama_report_over_cross_attention_layers_equals_transformers(mllama):
    model, hf, inputs = mllama
    ids, image = inputs["input_ids"], {k: v for k, v in inputs.items() if k != "input_ids"}
    report = analyze(model, ids, max_new_tokens=STEPS, top=0.3, mass=0.8, **image)
    reference_tokens = hf.generate(**inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False)
    assert report.tokens == reference_tokens[0, ids.shape[1]:].tolist() and len(set(report.tokens)) > 2
    attention, rows = mllama_reference(hf, inputs, report.tokens)
    assert_report_matches(report, {"modal_shares": None, **reference_image_quantities(attention, rows, 0.3, 0.8)})
    assert_invariants(report)
    assert (report.attention, report.decoder_layers, report.n_image) == ("cross", [1, 3], MLLAMA_TILES * 5)
    assert report.to_dict()["modal_shares"] is None and report.layers == 2


def test_mllama_recorded_cross_attention_rows_equal_transformers(mllama):
    """A_x[t, l] over every feature row, the padding tile's rows included (0, as the model masks them),
    and observing changes nothing."""
    model, hf, inputs = mllama
    ids, image = inputs["input_ids"], {k: v for k, v in inputs.items() if k != "input_ids"}
    recorder = AttentionRecorder()
    with observing(model, recorder):
        observed = avl.generate(model, ids, **image, max_new_tokens=STEPS, output_logits=True)
    plain = avl.generate(model, ids, **image, max_new_tokens=STEPS, output_logits=True)
    assert torch.equal(observed.logits, plain.logits)
    reference, rows = mllama_reference(hf, inputs, observed.tokens[0].tolist())
    recorded = recorder.cross_steps()
    assert len(recorded) == STEPS and sorted(recorder.cross_attention) == [1, 3]
    assert recorder.cross_allowed.nonzero()[:, 0].tolist() == rows
    for ours, ref in zip(recorded, reference):
        assert ours.shape == (2, 4 * 5)
        assert (ours - torch.tensor(ref, dtype=torch.float64)).abs().max() <= TOL
        assert torch.equal(ours[:, MLLAMA_TILES * 5:], torch.zeros(2, 5, dtype=torch.float64))


def test_mllama_without_an_image_is_named(mllama):
    model = mllama[0]
    with pytest.raises(ValueError, match="needs an image"):
        analyze(model, torch.tensor([[1, 5, 6, 7]]), max_new_tokens=2)


def test_mean_of_reports_is_element_wise():
    a = AttentionReport([1], [dict.fromkeys(("system", "image", "instruction", "generated"), 0.25)], [[0.5, 1.0]],
                        [1.0, 0.5], [[1.0], [1.0]], 16.0, 0.3, 0.8)
    b = AttentionReport([2], [{"system": 0.5, "image": 0.5, "instruction": 0.0, "generated": 0.0}], [[1.0, 0.5]],
                        [1.0, 0.0], [[1.0], [1.0]], 20.0, 0.3, 0.8)
    mean = AttentionReport.mean([a, b])
    assert mean.modal_shares == [{"system": 0.375, "image": 0.375, "instruction": 0.125, "generated": 0.125}]
    assert (mean.concentration, mean.ppci_layers, mean.n_image, mean.samples) == ([[0.75, 0.75]], [1.0, 0.25], 18.0, 2)
    with pytest.raises(ValueError, match="cannot average"):
        AttentionReport.mean([a, AttentionReport([3], a.modal_shares, a.concentration, a.ppci_layers, a.ppci_steps,
                                                 16.0, 0.5, 0.8)])


def test_mean_of_cross_attention_reports_has_no_shares_and_does_not_mix_with_self_attention():
    a = AttentionReport([1], None, [[0.5, 1.0]], [1.0, 0.5], [[1.0], [1.0]], 15.0, 0.3, 0.8, attention="cross",
                        decoder_layers=[1, 3])
    b = AttentionReport([2], None, [[1.0, 0.5]], [1.0, 0.0], [[1.0], [1.0]], 10.0, 0.3, 0.8, attention="cross",
                        decoder_layers=[1, 3])
    mean = AttentionReport.mean([a, b])
    assert (mean.modal_shares, mean.attention, mean.decoder_layers, mean.n_image) == (None, "cross", [1, 3], 12.5)
    assert (mean.steps, mean.concentration) == (1, [[0.75, 0.75]])
    shares = [dict.fromkeys(("system", "image", "instruction", "generated"), 0.25)]
    own = AttentionReport([3], shares, a.concentration, a.ppci_layers, a.ppci_steps, 16.0, 0.3, 0.8,
                          decoder_layers=[0, 1])
    with pytest.raises(ValueError, match="attention='self'"):
        AttentionReport.mean([a, own])


IDS = torch.tensor([prompt_ids(2, 3, 16, seed=1)])
PIXELS = torch.randn(1, 3, 48, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kwargs,message", [
    ({"top": 0.0}, r"top=0.0 is invalid"),
    ({"mass": 1.5}, r"mass=1.5 is invalid"),
    ({"input_ids": IDS.repeat(2, 1), "pixel_values": PIXELS.repeat(2, 1, 1, 1)}, r"takes one \(batch 1\)"),
    ({"attention_mask": torch.ones_like(IDS).index_fill(1, torch.tensor([0]), 0)}, r"has padding"),
    ({"input_ids": torch.tensor([[1, 5, 6, 7]]), "pixel_values": None}, r"no image rows"),
], ids=["top", "mass", "batch", "padding", "no-image"])
def test_bad_inputs_are_named(llava, kwargs, message):
    model, _ = llava
    with pytest.raises(ValueError, match=message):
        analyze(model, **{"input_ids": IDS, "pixel_values": PIXELS, "max_new_tokens": 2, **kwargs})
