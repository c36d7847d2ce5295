"""Tiny random Qwen2-VL / Qwen2.5-VL checkpoints written by transformers itself (save_pretrained), and
prompts with `<|image_pad|>` runs for them. No downloads."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 408  # the ids of `build_qwen2_tokenizer`: 394 byte-level BPE tokens, then the 14 specials
IMAGE_ID, VIDEO_ID, VISION_START, VISION_END = 406, 407, 403, 404
PATCH_ROW = 3 * 2 * 14 * 14  # channels * temporal_patch_size * patch_size**2


def text_config(**overrides) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}) | overrides


def build_hf(directory: Path, family: str, seed: int = 0, tie: bool = False, text: dict | None = None,
             **vision_overrides):
    """Write a tiny float64 checkpoint of `family` ("qwen2_vl" or "qwen2_5_vl") and return the
    transformers model (`text`: overrides of `text_config()`). Weights are redrawn at std 0.2 (biases
    and norm gains included) so that a wrong rotary, window or position rule moves the outputs far
    beyond the tolerances."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    ids = dict(image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, vision_start_token_id=VISION_START,
               vision_end_token_id=VISION_END, tie_word_embeddings=tie)
    if family == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2) | vision_overrides
        config, cls = Qwen2VLConfig(text_config=text_config(**(text or {})), vision_config=vision, **ids), \
            Qwen2VLForConditionalGeneration
    else:
        vision = dict(depth=4, hidden_size=32, intermediate_size=48, out_hidden_size=64, num_heads=4, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                      fullatt_block_indexes=[1, 3]) | vision_overrides
        config, cls = Qwen2_5_VLConfig(text_config=text_config(**(text or {})), vision_config=vision, **ids), \
            Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    model = cls(config).to(torch.float64).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.2
            p.copy_(1.0 + noise if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "ln_q.weight",
                                                    "layernorm.weight")) else noise)
    model.save_pretrained(directory)
    return model


def random_pixels(grid_thw: torch.Tensor, seed: int) -> torch.Tensor:
    rows = int(grid_thw.prod(-1).sum())
    return torch.randn(rows, PATCH_ROW, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def image_prompt(before: list[int], grids: list[list[int]], after: list[int], merge: int = 2) -> list[int]:
    """Text, then each image as <|vision_start|> + its <|image_pad|> run + <|vision_end|>, then text."""
    ids = list(before)
    for t, h, w in grids:
        ids += [VISION_START] + [IMAGE_ID] * (t * h * w // merge**2) + [VISION_END]
    return ids + list(after)


def left_pad(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


# The chat template of Qwen/Qwen2-VL-7B-Instruct (`chat_template.json`; Qwen2.5-VL ships the same).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
            "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
_CORPUS = """You are a helpful assistant. Describe this image. What is in the picture?
The picture shows a red bus on a city street, next to a tall building and three people.
How many dogs are there? There are two dogs playing with a ball on the green grass.
Read the text in the image: "Open 24 hours". Numbers 0 1 2 3 12 24 100 336 2048.
"""


def build_qwen2_tokenizer(directory: Path, n_merges: int = 200) -> dict[str, int]:
    """A tiny byte-level BPE tokenizer with Qwen2's pipeline (NFC, the Qwen2 split regex, ByteLevel
    without prefix space, no post-processor) and Qwen2-VL's special tokens after the vocabulary;
    writes `tokenizer.json` and `tokenizer_config.json`. Returns the special tokens' ids."""
    import json

    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    split = pre_tokenizers.Split(Regex(r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}"""
                                       r"""\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""), behavior="isolated")
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                  use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=256 + n_merges, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, min_frequency=1)
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIALS}
    assert (ids["<|image_pad|>"], ids["<|video_pad|>"], ids["<|vision_start|>"], ids["<|vision_end|>"]) == \
        (IMAGE_ID, VIDEO_ID, VISION_START, VISION_END) and tok.get_vocab_size() == VOCAB
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": None, "errors": "replace", "model_max_length": 32768,
        "added_tokens_decoder": {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True} for t, i in ids.items()},
    }, indent=1))
    return ids


def build_checkpoint(directory: Path, family: str, seed: int = 0):
    """A complete tiny checkpoint directory of `family`: transformers' weights (`build_hf`), the tiny
    Qwen2 tokenizer, the hub's chat template and a preprocessor config with small pixel bounds (at
    most 20000 pixels: up to 25 image tokens). Returns the transformers model."""
    import json

    hf = build_hf(directory, family, seed=seed)
    build_qwen2_tokenizer(directory)
    (directory / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    (directory / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 3136, "max_pixels": 20000}))
    return hf
