"""`avl.analyze` against an independent computation from transformers' eager attentions.

The reference runs transformers' own model (eager attention, float64, `output_attentions=True`) once
over the prompt and the generated tokens, takes A[t, l] = the head mean of row L - 1 + t over rows
0 .. L + t - 1, and computes every quantity of the report from it in plain Python; modalities come
from the input ids (image token), not from avl's layout. transformers' eager attention takes its softmax in float32 even for a float64
model, so its probabilities carry float32 rounding (a few 1e-8): the tolerance is 1e-6.
"""

from __future__ import annotations

import math

import pytest
import torch

import avl
from avl.analysis import AttentionRecorder, AttentionReport, analyze, observing
from tiny_llava import IMAGE_TOKEN, PAD_TOKEN, prompt_ids, save_hf_llava

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


def reference_attention(hf, ids: torch.Tensor, tokens: list[int], **image) -> list[list[list[float]]]:
    """A[t][l] (lists of floats) from transformers' eager attentions over prompt + generated tokens."""
    sequence = torch.cat([ids, torch.tensor([tokens[:-1]])], dim=1)
    with torch.no_grad():
        out = hf(input_ids=sequence, attention_mask=torch.ones_like(sequence), output_attentions=True, **image)
    prompt = ids.shape[1]
    return [[layer[0, :, prompt - 1 + t, :prompt + t].mean(0).tolist() for layer in out.attentions]
            for t in range(len(tokens))]


def reference_report(attention: list[list[list[float]]], ids: list[int], top: float, mass: float) -> dict:
    """Every quantity of the report, by the issue's definitions, in plain Python."""
    image = [i for i, token in enumerate(ids) if token == IMAGE_TOKEN]
    rows = {"system": range(image[0]), "image": image,
            "instruction": [i for i in range(image[0], len(ids)) if i not in image]}
    shares, concentration = [], []
    for t, layers in enumerate(attention):
        rows["generated"] = range(len(ids), len(ids) + t)
        shares.append({name: sum(sum(a[i] for i in r) for a in layers) / len(layers) for name, r in rows.items()})
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
        "modal_shares": shares,
        "concentration": concentration,
        "ppci_layers": [len(top_set(0, 0) & top_set(0, layer)) / k_top for layer in range(n_layers)],
        "ppci_steps": [[len(top_set(0, layer) & top_set(t, layer)) / k_top for t in range(len(attention))]
                       for layer in range(n_layers)],
    }


def assert_report_matches(report: AttentionReport, expected: dict) -> None:
    assert len(report.modal_shares) == len(expected["modal_shares"]) == STEPS
    for ours, ref in zip(report.modal_shares, expected["modal_shares"]):
        assert ours.keys() == ref.keys()
        assert max(abs(ours[m] - ref[m]) for m in ref) <= TOL
    for name in ("concentration", "ppci_steps"):
        ours, ref = torch.tensor(getattr(report, name)), torch.tensor(expected[name])
        assert ours.shape == ref.shape and (ours - ref).abs().max() <= TOL, name
    assert (torch.tensor(report.ppci_layers) - torch.tensor(expected["ppci_layers"])).abs().max() <= TOL


def assert_invariants(report: AttentionReport) -> None:
    for shares in report.modal_shares:
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
