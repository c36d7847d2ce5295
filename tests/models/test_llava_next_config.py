"""LlavaNextConfig from the hub's config.json layouts; parameter names and shapes of the real sizes."""

from __future__ import annotations

import copy

import pytest
import torch

import avl
from avl.models.llava_next import LlavaNext, LlavaNextConfig
from avl.weights import KeyMap

PINPOINTS_336 = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
CLIP_L_336 = {"model_type": "clip_vision_model", "hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
              "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768,
              "vocab_size": 32000}
# llava-hf/llava-v1.6-mistral-7b-hf config.json (fields that matter; the hub file also has
# "use_image_newline_parameter": true, torch_dtype, architectures, ...)
MISTRAL_7B = {
    "model_type": "llava_next", "image_grid_pinpoints": PINPOINTS_336, "image_token_index": 32000,
    "projector_hidden_act": "gelu", "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
    "tie_word_embeddings": False, "use_image_newline_parameter": True, "vision_config": CLIP_L_336,
    "text_config": {"_name_or_path": "mistralai/Mistral-7B-Instruct-v0.2", "architectures": ["MistralForCausalLM"],
                    "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mistral",
                    "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
                    "sliding_window": None, "vocab_size": 32064},
}
# llava-hf/llava-v1.6-vicuna-7b-hf config.json
VICUNA_7B = {
    "model_type": "llava_next", "image_grid_pinpoints": PINPOINTS_336, "image_token_index": 32000,
    "projector_hidden_act": "gelu", "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
    "tie_word_embeddings": False, "use_image_newline_parameter": True, "vision_config": CLIP_L_336,
    "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                    "max_position_embeddings": 4096, "model_type": "llama", "pad_token_id": 0,
                    "rms_norm_eps": 1e-05, "vocab_size": 32000},
}


def with_text(raw: dict, **text) -> dict:
    out = copy.deepcopy(raw)
    out["text_config"].update(text)
    return out


def test_mistral_7b_config():
    cfg = LlavaNextConfig.from_dict(MISTRAL_7B)
    assert cfg.image_grid_pinpoints == tuple(tuple(p) for p in PINPOINTS_336)
    assert (cfg.text.num_attention_heads, cfg.text.num_key_value_heads, cfg.text.rope_theta) == (32, 8, 1e6)
    assert cfg.text.vocab_size == 32064 and cfg.image_token_index == 32000
    assert cfg.sliding_window is None  # null on the hub
    assert cfg.image_tokens_per_image == 576  # the base tile


def test_sliding_window_follows_the_text_model_type():
    raw = copy.deepcopy(MISTRAL_7B)
    del raw["text_config"]["sliding_window"]
    assert LlavaNextConfig.from_dict(raw).sliding_window == 4096  # transformers' MistralConfig default
    assert LlavaNextConfig.from_dict(with_text(MISTRAL_7B, sliding_window=2048)).sliding_window == 2048
    assert LlavaNextConfig.from_dict(VICUNA_7B).sliding_window is None  # Llama has none


def test_defaults_when_pinpoints_are_absent():
    raw = copy.deepcopy(VICUNA_7B)
    del raw["image_grid_pinpoints"]
    assert LlavaNextConfig.from_dict(raw).image_grid_pinpoints == tuple(tuple(p) for p in PINPOINTS_336)


@pytest.mark.parametrize("raw", [VICUNA_7B, MISTRAL_7B], ids=["vicuna-7b", "mistral-7b"])
def test_parameter_names_and_shapes_equal_transformers(raw):
    """Built on the meta device at the real sizes: every transformers parameter maps to one of ours, same shape."""
    from transformers import LlavaNextConfig as HFConfig
    from transformers import LlavaNextForConditionalGeneration

    with torch.device("meta"):
        hf = LlavaNextForConditionalGeneration(HFConfig(**copy.deepcopy(raw)))
        ours = LlavaNext(LlavaNextConfig.from_dict(raw))
    # plus transformers 5's in-memory vision names (its saved files say `vision_tower.*`, which map to themselves)
    key_map = KeyMap((*LlavaNext.key_map, ("model.vision_tower.", "vision_tower.")))
    ref = {key_map.rename(k): tuple(v.shape) for k, v in hf.state_dict().items()}
    ref = {k: v for k, v in ref.items() if not k.endswith("position_ids")}  # transformers' CLIP buffer
    assert ref == {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert ours.image_newline.shape == (4096,)


@pytest.mark.parametrize("change,match", [
    ({"image_grid_pinpoints": [[336, 600]]}, r"\[336, 600\] is not a multiple of the tile size 336"),
    ({"image_grid_pinpoints": []}, r"image_grid_pinpoints=\[\] must be a non-empty list"),
    ({"image_grid_pinpoints": [[336]]}, r"entry \[336\] must be a \[height, width\] pair"),
    ({"vision_feature_select_strategy": "full"}, r"vision_feature_select_strategy='full' is not supported; "
                                                 r"allowed: \['default'\]"),
])
def test_bad_configs_are_named(change, match):
    with pytest.raises(ValueError, match=match):
        LlavaNextConfig.from_dict({**copy.deepcopy(MISTRAL_7B), **change})


def test_unsupported_text_models_and_windows_are_named():
    with pytest.raises(ValueError, match=r"text_config.model_type='qwen2' is not supported"):
        LlavaNextConfig.from_dict(with_text(VICUNA_7B, model_type="qwen2"))
    with pytest.raises(ValueError, match=r"text_config.sliding_window=0 is not supported"):
        LlavaNextConfig.from_dict(with_text(MISTRAL_7B, sliding_window=0))


def tiny_raw(sliding_window: int | None) -> dict:
    return {"model_type": "llava_next", "image_token_index": 300, "image_grid_pinpoints": [[24, 48], [48, 24]],
            "vision_config": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                              "num_attention_heads": 2, "image_size": 24, "patch_size": 6},
            "text_config": {"model_type": "mistral", "vocab_size": 320, "hidden_size": 32, "intermediate_size": 64,
                            "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
                            "sliding_window": sliding_window}}


def test_a_sequence_longer_than_the_sliding_window_is_an_error():
    model = LlavaNext(LlavaNextConfig.from_dict(tiny_raw(60)))
    n = model.num_image_tokens((24, 48))  # 16 + 4 rows x (8 + 1)
    ids = torch.tensor([[1] * 10 + [300] * n + [5] * 3])  # 65 tokens
    kwargs = dict(pixel_values=torch.zeros(1, 3, 3, 24, 24), image_sizes=[(24, 48)])
    with pytest.raises(ValueError, match=r"prompt \(65 tokens\) \+ new tokens \(4\) = 69 exceeds the text model's "
                                         r"sliding_window=60"):
        avl.generate(model, ids, max_new_tokens=4, **kwargs)
    wide = LlavaNext(LlavaNextConfig.from_dict(tiny_raw(69)))
    assert avl.generate(wide, ids, max_new_tokens=4, **kwargs).tokens.shape == (1, 4)
