"""Session fixtures shared by the test packages."""

from __future__ import annotations

import pytest

from tiny_llava import save_hf_llava


@pytest.fixture(scope="session")
def hf_llava(tmp_path_factory):
    """(directory, transformers model) of a tiny float64 LLaVA with 16 image tokens."""
    directory = tmp_path_factory.mktemp("hf_llava")
    return directory, save_hf_llava(directory)
