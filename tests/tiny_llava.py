"""Test helpers: tiny random LLaVA checkpoints written by transformers itself, prompts, fixtures path."""

from __future__ import annotations

import os
from pathlib import Path

import torch

import avl
from avl.cache.kv_policies import AdaKV, KNorm, ObservedAttention, PyramidKV, RandomEviction, SnapKV

FIXTURES = Path(__file__).resolve().parent / "fixtures"  # the reference fixtures in the repository


def fixture_folders(bundled: str, env: str) -> list[Path]:
    """Every reference-fixture folder (one holding `expected.json`): `tests/fixtures/<bundled>`, plus
    each path in `$env` (os.pathsep-separated; a fixture folder or a folder of them), which adds
    folders to the bundled ones. A path in `$env` that holds no fixture raises, naming it."""
    folders: list[Path] = []
    extra = [Path(p).expanduser() for p in os.environ.get(env, "").split(os.pathsep) if p]
    for root in [FIXTURES / bundled, *extra]:
        found = [root] if (root / "expected.json").is_file() else \
            sorted(p for p in root.iterdir() if (p / "expected.json").is_file()) if root.is_dir() else []
        if not found:
            raise FileNotFoundError(f"no reference fixture (a folder with expected.json) at {root}"
                                    + (f" (from ${env})" if root in extra else ""))
        folders += [f for f in found if f.resolve() not in {g.resolve() for g in folders}]
    return folders


AVL_FIXTURES = fixture_folders("avl-reference", "AVL_REFERENCE_FIXTURES")
QWEN_FIXTURES = fixture_folders("qwen-vl-reference", "QWEN_VL_REFERENCE_FIXTURES")

IMAGE_TOKEN = 300
PAD_TOKEN = 301


# one policy of each kind, with every A-VL part, for the batched-equals-per-sample tests of each family
POLICIES = [
    avl.Full(),
    avl.AVL(secondary=0.5, core=0.25, refresh_every=2, prefill_keep=0.75, text_keep=0.5),
    avl.AVL(text_keep=0.3, text_min_budget=2),
    avl.FastV(layer=1, keep=0.5),
    avl.H2O(budget=0.5),
    avl.StreamingLLM(sinks=2, window=8),
    # the kvpress-pinned policies, with windows shorter than the tests' shortest prompt (23 rows)
    SnapKV(0.5, window_size=4, kernel_size=3),
    PyramidKV(0.5, window_size=4, kernel_size=3, beta=2),
    AdaKV(SnapKV(0.5, window_size=4, kernel_size=3), alpha_safeguard=0.2),
    KNorm(0.6),
    ObservedAttention(0.5),
    RandomEviction(0.5, seed=1),
    avl.StreamingLLM(sinks=2, window=8, positions="original"),
    avl.VLCache(0.5),
]


def tiny_hf_llava_config(num_key_value_heads: int = 4, rope_theta: float = 10000.0, image_size: int = 48):
    """A tiny LLaVA-1.5-shaped transformers config: CLIP 48 px / patch 12 -> 16 image tokens."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=image_size, patch_size=12, projection_dim=32)
    text = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=num_key_value_heads, rope_theta=rope_theta,
                       max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN, pad_token_id=PAD_TOKEN,
                       vision_feature_layer=-2, vision_feature_select_strategy="default")


def save_hf_llava(directory: Path, seed: int = 0, max_shard_size: str | None = None, **config_kwargs):
    """Random-init a transformers LlavaForConditionalGeneration in float64, save it, return it (eval)."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(tiny_hf_llava_config(**config_kwargs)).to(torch.float64).eval()
    with torch.no_grad():  # transformers' init is tiny; widen it so logits differ clearly between tokens
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    return model


def prompt_ids(n_before: int, n_after: int, n_image_tokens: int, seed: int) -> list[int]:
    """Random text ids (avoiding special ids) around one expanded image placeholder."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, 290, (n_before + n_after,), generator=g).tolist()
    return [1, *text[:n_before], *[IMAGE_TOKEN] * n_image_tokens, *text[n_before:]]


def left_pad(rows: list[list[int]], pad: int = PAD_TOKEN) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def build_tiny_next_checkpoint(directory: Path) -> Path:
    """A complete tiny random LLaVA-NeXT checkpoint directory written by transformers: weights,
    tokenizer (avl's tiny Llama tokenizer) and an anyres preprocessor config (24 px tiles)."""
    import json

    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    from avl.testing.llama_tokenizer import build_tiny_llama_tokenizer

    ids = build_tiny_llama_tokenizer(directory, vocab_size=512)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=24, patch_size=6, projection_dim=32)
    text = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, tie_word_embeddings=False)
    pinpoints = [[24, 48], [48, 24]]
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_grid_pinpoints=pinpoints,
                             image_token_index=ids["image_token_id"], pad_token_id=ids["pad_token_id"])
    torch.manual_seed(0)
    LlavaNextForConditionalGeneration(config).save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "LlavaNextImageProcessor", "crop_size": {"height": 24, "width": 24},
        "size": {"shortest_edge": 24}, "image_grid_pinpoints": pinpoints}))
    return directory


def build_tiny_qwen_checkpoint(directory: Path) -> Path:
    """The Qwen-VL reference fixture's tiny checkpoint with a `qwen.tiktoken` of 86 single-character
    ranks, which puts `<img>` at the config's image_start_id (86 + 3 + 205 + 6 = 300)."""
    import base64
    import shutil
    import string

    source = FIXTURES / "qwen-vl-reference"
    directory.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(source / name, directory / name)
    chars = string.ascii_letters + string.digits + " \n:.?,!'-()[]{}<>/\\\"#;=+"
    assert len(chars) == 86
    (directory / "qwen.tiktoken").write_text(
        "".join(f"{base64.b64encode(c.encode()).decode()} {rank}\n" for rank, c in enumerate(chars)))
    return directory


def build_tiny_mllama_checkpoint(directory: Path) -> Path:
    """A complete tiny random Llama-3.2-Vision checkpoint directory written by transformers: weights
    (28 px tiles, 2 of 4 text layers cross-attend), avl's tiny tokenizer plus `<|image|>`, and an
    Mllama preprocessor config."""
    import json

    from tokenizers import AddedToken
    from tokenizers import Tokenizer as BackendTokenizer
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    from avl.testing.llama_tokenizer import build_tiny_llama_tokenizer

    ids = build_tiny_llama_tokenizer(directory, vocab_size=512)
    backend = BackendTokenizer.from_file(str(directory / "tokenizer.json"))
    backend.add_special_tokens([AddedToken("<|image|>", special=True, normalized=False)])
    backend.save(str(directory / "tokenizer.json"))
    image_id = backend.token_to_id("<|image|>")
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1, attention_heads=4,
                  image_size=28, patch_size=14, max_num_tiles=4, intermediate_layers_indices=[0],
                  vision_output_dim=64)
    text = dict(vocab_size=image_id + 8, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, cross_attention_layers=[1, 3],
                bos_token_id=1, eos_token_id=2, pad_token_id=ids["pad_token_id"])
    torch.manual_seed(0)
    config = MllamaConfig(vision_config=vision, text_config=text, image_token_index=image_id)
    MllamaForConditionalGeneration(config).save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "MllamaImageProcessor", "size": {"height": 28, "width": 28}, "max_image_tiles": 4}))
    return directory


def build_tiny_onevision_checkpoint(directory: Path) -> Path:
    """A complete tiny random LLaVA-OneVision checkpoint directory written by transformers: weights
    (SigLIP 26 px tiles / patch 6, grids up to 2 x 2, Qwen2 of 3 layers with 2 KV heads), avl's tiny Qwen2 tokenizer,
    llava-hf's processing configs and its chat template (`chat_template.json`)."""
    import json

    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    from avl.testing.qwen2_tokenizer import build_tiny_qwen2_tokenizer
    from avl.processing.llava_onevision import ONEVISION_CHAT_TEMPLATE
    from avl.processing.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(build_tiny_qwen2_tokenizer(directory))
    tile = 26
    pinpoints = [[tile * r, tile * c] for r in (1, 2) for c in (1, 2)]
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=tile, patch_size=6, vision_use_head=False)
    text = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_grid_pinpoints=pinpoints,
                                  image_token_index=tokenizer.token_to_id("<image>"),
                                  video_token_index=tokenizer.token_to_id("<video>"),
                                  pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlavaOnevisionForConditionalGeneration(config).save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "LlavaOnevisionImageProcessor", "size": {"height": tile, "width": tile},
        "image_grid_pinpoints": pinpoints, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "resample": 3}))
    (directory / "processor_config.json").write_text(json.dumps({
        "num_image_tokens": 16, "vision_feature_select_strategy": "full", "vision_aspect_ratio": "anyres_max_9"}))
    (directory / "chat_template.json").write_text(json.dumps({"chat_template": ONEVISION_CHAT_TEMPLATE}))
    return directory
