"""A same-dtype load of a 128 MiB checkpoint keeps the weights memory-mapped: no second copy.

Measured with the process's anonymous resident memory (``RssAnon`` in /proc/self/status): a copy
of the weights would be anonymous memory, whereas pages of the mapped file count as ``RssFile``
(page cache, shared and reclaimable). The cast load is the control showing the measure works.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from avl.weights import KeyMap, load_checkpoint, save_sharded

ROWS, DIM = 32768, 1024  # 32768 x 1024 float32 = 128 MiB
MIB = 2**20

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")


def _rss_anon_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no RssAnon in /proc/self/status")


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges of ``path`` mapped into this process."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path)):
            lo, hi = line.split()[0].split("-")
            ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


class Big(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(ROWS, DIM)
        self.head = nn.Linear(DIM, 4)


@pytest.fixture(scope="module")
def big_ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """The checkpoint, and a few rows of the source to compare with (the source is freed)."""
    out = tmp_path_factory.mktemp("big")
    gen = torch.Generator().manual_seed(0)
    state = {
        "embed.weight": torch.empty(ROWS, DIM).uniform_(-1, 1, generator=gen),
        "head.weight": torch.randn(4, DIM, generator=gen),
        "head.bias": torch.randn(4, generator=gen),
    }
    save_sharded(state, out, "1GB", config={})
    sample = {"rows": state["embed.weight"][::997].clone(), "head.weight": state["head.weight"].clone()}
    del state
    gc.collect()
    return out, sample


def test_same_dtype_load_is_mmap_backed(big_ckpt: tuple[Path, dict[str, torch.Tensor]]) -> None:
    ckpt, sample = big_ckpt
    file = ckpt / "model.safetensors"
    size_mib = file.stat().st_size / MIB
    assert size_mib > 120

    with torch.device("meta"):
        model = Big()
    before = _rss_anon_mib()
    load_checkpoint(model, ckpt, KeyMap(), dtype=torch.float32, device="cpu")
    loaded = _rss_anon_mib() - before
    # read every page of the weights: still file pages, not anonymous memory
    assert torch.equal(model.embed.weight[::997], sample["rows"])
    assert torch.equal(model.head.weight, sample["head.weight"])
    total = float(model.embed.weight.detach().sum())
    touched = _rss_anon_mib() - before

    assert loaded < 8, f"RssAnon grew {loaded:.1f} MiB loading a {size_mib:.0f} MiB file"
    assert touched < 8, f"RssAnon grew {touched:.1f} MiB after reading all {size_mib:.0f} MiB"
    assert abs(total) < ROWS * DIM  # a real number was computed from the mapped pages
    ptr = model.embed.weight.untyped_storage().data_ptr()
    assert any(lo <= ptr < hi for lo, hi in _mapped_ranges(file)), (
        "weight storage is not inside the file's mmap"
    )
    assert isinstance(model.embed.weight, nn.Parameter)


def test_cast_load_allocates_a_copy(big_ckpt: tuple[Path, dict[str, torch.Tensor]]) -> None:
    """The control: casting to bfloat16 must allocate ~64 MiB of anonymous memory."""
    ckpt, sample = big_ckpt
    with torch.device("meta"):
        model = Big()
    before = _rss_anon_mib()
    load_checkpoint(model, ckpt, KeyMap(), dtype=torch.bfloat16, device="cpu")
    grown = _rss_anon_mib() - before
    assert grown > 0.8 * ROWS * DIM * 2 / MIB, f"RssAnon grew only {grown:.1f} MiB"
    assert model.embed.weight.dtype == torch.bfloat16
    assert torch.equal(model.embed.weight[::997], sample["rows"].to(torch.bfloat16))
    ptr = model.embed.weight.untyped_storage().data_ptr()
    assert not any(lo <= ptr < hi for lo, hi in _mapped_ranges(ckpt / "model.safetensors"))


def test_loaded_weights_outlive_the_file_handles_and_writes_stay_private(
    big_ckpt: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    """The mapping is private (copy-on-write): an in-place update never reaches the file."""
    ckpt, sample = big_ckpt
    with torch.device("meta"):
        model = Big()
    load_checkpoint(model, ckpt, KeyMap())
    gc.collect()
    with torch.no_grad():
        model.head.weight.add_(1.0)
    assert torch.equal(model.head.weight, sample["head.weight"] + 1.0)
    with torch.device("meta"):
        again = load_checkpoint(Big(), ckpt, KeyMap())
    assert torch.equal(again.head.weight, sample["head.weight"])
