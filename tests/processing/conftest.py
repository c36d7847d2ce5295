"""Shared fixtures: a tiny Llama tokenizer directory and synthetic images (no downloads)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from PIL import Image

from avl.testing.llama_tokenizer import build_tiny_llama_tokenizer


@pytest.fixture(scope="session")
def tiny_tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny_tok")
    build_tiny_llama_tokenizer(out)
    return out


def noise_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Random RGBA noise (varying alpha) converted to `mode`; "P" is a 16-colour quantisation."""
    rng = random.Random(seed * 7919 + width * 31 + height)
    data = rng.randbytes(width * height * 4)
    image = Image.frombytes("RGBA", (width, height), data)
    if mode == "P":
        return image.convert("RGB").quantize(16)
    return image.convert(mode)


@pytest.fixture(scope="session")
def make_image():
    """The `noise_image` factory (test modules cannot import conftest under importlib mode)."""
    return noise_image
