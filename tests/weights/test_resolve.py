"""resolve_checkpoint: local directories, and hub ids served from a hand-made offline HF cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from avl.weights import checkpoint_files, read_config, resolve_checkpoint, save_sharded

SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HF hub cache in tmp, offline. huggingface_hub reads its env at import, so its
    ``constants`` are patched as well as the environment."""
    from huggingface_hub import constants

    home = tmp_path / "hf_home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def _cache_repo(
    cache: Path, repo_id: str, files: dict[str, bytes], ref: str = "main", sha: str = SHA
) -> Path:
    """Write ``models--owner--name/{refs/<ref>, snapshots/<sha>/...}`` as huggingface_hub does
    (real caches symlink snapshot files to blobs/; plain files are equivalent for reading)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / sha
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    (repo / "refs").mkdir()
    (repo / "refs" / ref).write_text(sha)
    return snapshot


def _weights(tmp_path: Path) -> dict[str, bytes]:
    out = tmp_path / "w"
    paths = save_sharded({"a": torch.ones(4), "b": torch.zeros(4)}, out, 16)
    files = {p.name: p.read_bytes() for p in paths}
    files["model.safetensors.index.json"] = (out / "model.safetensors.index.json").read_bytes()
    return files


def test_local_directory_used_as_is(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert resolve_checkpoint(tmp_path) == tmp_path.resolve()
    assert resolve_checkpoint(str(tmp_path)) == tmp_path.resolve()


def test_local_directory_without_config_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"checkpoint directory '{tmp_path}' has no config.json"):
        resolve_checkpoint(tmp_path)


def test_local_directory_with_revision_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="revision only applies to hub ids"):
        resolve_checkpoint(tmp_path, revision="main")


def test_file_instead_of_directory(tmp_path: Path) -> None:
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="is a file; expected a checkpoint directory"):
        resolve_checkpoint(f)


@pytest.mark.parametrize("value", ["./no/such/dir", "/no/such/dir", "no/such/dir", "a/../b"])
def test_nonexistent_path_not_an_id(value: str) -> None:
    with pytest.raises(FileNotFoundError, match=f"checkpoint '{value}' not found"):
        resolve_checkpoint(value)


def test_pathlike_is_never_a_hub_id(hf_cache: Path, tmp_path: Path) -> None:
    _cache_repo(hf_cache, "owner/name", {"config.json": b"{}"})
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_checkpoint(Path("owner/name"))


def test_hub_id_from_offline_cache(hf_cache: Path, tmp_path: Path) -> None:
    files = {"config.json": json.dumps({"model_type": "toy"}).encode(), **_weights(tmp_path)}
    snapshot = _cache_repo(hf_cache, "owner/name", files)
    resolved = resolve_checkpoint("owner/name")
    assert resolved == snapshot
    assert read_config(resolved) == {"model_type": "toy"}
    assert [p.name for p in checkpoint_files(resolved)] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    # a commit hash and a branch both resolve offline
    assert resolve_checkpoint("owner/name", revision=SHA) == snapshot
    assert resolve_checkpoint("owner/name", revision="main") == snapshot


def test_hub_id_with_bin_weights_only(hf_cache: Path, tmp_path: Path) -> None:
    torch.save({"a": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    files = {"config.json": b"{}", "pytorch_model.bin": (tmp_path / "pytorch_model.bin").read_bytes()}
    snapshot = _cache_repo(hf_cache, "Qwen/Qwen-VL-Chat", files)
    assert checkpoint_files(resolve_checkpoint("Qwen/Qwen-VL-Chat")) == [snapshot / "pytorch_model.bin"]


def test_unknown_id_offline_gives_clear_error(hf_cache: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        resolve_checkpoint("owner/missing")
    msg = str(err.value)
    assert "hub id 'owner/missing' was not found locally" in msg
    assert "no network is available (HF_HUB_OFFLINE is set)" in msg
    assert str(hf_cache) in msg


def test_unknown_revision_offline(hf_cache: Path) -> None:
    _cache_repo(hf_cache, "owner/name", {"config.json": b"{}"})
    with pytest.raises(
        FileNotFoundError, match=r"hub id 'owner/name' \(revision 'v2'\) was not found locally"
    ):
        resolve_checkpoint("owner/name", revision="v2")


def test_cached_snapshot_without_config(hf_cache: Path) -> None:
    _cache_repo(hf_cache, "owner/name", {"model.safetensors": b""})
    with pytest.raises(FileNotFoundError, match="hub snapshot of 'owner/name' at .* has no config.json"):
        resolve_checkpoint("owner/name")


def test_network_failure_falls_back_to_cache(hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Online mode, but the hub endpoint refuses connections: the cache answers."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on port 9
    snapshot = _cache_repo(hf_cache, "owner/name", {"config.json": b"{}"})
    assert resolve_checkpoint("owner/name") == snapshot
    with pytest.raises(
        FileNotFoundError,
        match=r"'owner/other' was not found locally .* no network is available \(.*ConnectError",
    ):
        resolve_checkpoint("owner/other")
