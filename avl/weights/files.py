"""Where a checkpoint lives and which files hold its weights.

A checkpoint is a directory in the hub's layout: ``config.json`` plus either

* ``model.safetensors``, or
* ``model.safetensors.index.json`` naming shards ``model-0000i-of-0000n.safetensors``, or
* ``pytorch_model.bin`` / ``pytorch_model.bin.index.json`` (older uploads, e.g. Qwen-VL),
  read with ``torch.load(mmap=True, weights_only=True)``.

``resolve_checkpoint`` turns a local path or a hub id into such a directory; hub ids go through
``huggingface_hub.snapshot_download`` and fall back to the local HF cache when offline.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from avl.weights.errors import CheckpointError, format_list

CONFIG_NAME = "config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"
BIN_WEIGHTS_NAME = "pytorch_model.bin"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"

# Looked for in this order (the order transformers uses): the first one present wins.
_WEIGHT_LAYOUTS = (SAFE_WEIGHTS_NAME, SAFE_INDEX_NAME, BIN_WEIGHTS_NAME, BIN_INDEX_NAME)

# Everything but weights that a VLM checkpoint needs: config, tokenizer, image processor, chat
# template, generation defaults. Remote code (*.py) is never fetched: this library is clean-room.
_METADATA_PATTERNS = [
    CONFIG_NAME,
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer*",
    "vocab.json",
    "merges.txt",
    "chat_template*",
    "*.tiktoken",
]
# "model*" rather than "*.safetensors": some repos also ship e.g. consolidated.safetensors.
_SAFETENSORS_PATTERNS = [SAFE_WEIGHTS_NAME, SAFE_INDEX_NAME, "model-*.safetensors"]
_BIN_PATTERNS = [BIN_WEIGHTS_NAME, BIN_INDEX_NAME, "pytorch_model-*.bin"]

# owner/name, as the hub spells repo ids (no leading "." or "/", exactly one slash).
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def looks_like_hub_id(value: str) -> bool:
    """True for strings of the form ``owner/name`` (which may also be a relative path)."""
    return bool(_HUB_ID.fullmatch(value)) and ".." not in value


def resolve_checkpoint(path_or_hub_id: str | os.PathLike[str], *, revision: str | None = None) -> Path:
    """Return the local checkpoint directory for a path or a hub id.

    * An existing local directory is used as is; it must contain ``config.json``.
    * Otherwise a string of the form ``owner/name`` is a hub id: config, tokenizer / processor
      files and the weights (safetensors, or ``pytorch_model*.bin`` when the repo has no
      safetensors) are fetched with ``huggingface_hub.snapshot_download``. When the network is
      unavailable or ``HF_HUB_OFFLINE=1``, the snapshot already in the local HF cache is used.
    * Anything else raises ``FileNotFoundError`` naming it.

    ``os.PathLike`` values are always local paths. ``revision`` (branch, tag or commit) only
    applies to hub ids.
    """
    raw = os.fspath(path_or_hub_id)
    local = Path(raw).expanduser()
    if local.is_dir():
        if revision is not None:
            raise ValueError(
                f"revision={revision!r} was given, but {raw!r} is a local directory; "
                "revision only applies to hub ids"
            )
        _require_config(local, what=f"checkpoint directory {str(local)!r}")
        return local.resolve()
    if local.exists():
        raise FileNotFoundError(
            f"{raw!r} is a file; expected a checkpoint directory (holding config.json and weights) "
            "or a hub id like 'owner/name'"
        )
    if isinstance(path_or_hub_id, str) and looks_like_hub_id(raw):
        snapshot = _hub_snapshot(raw, revision)
        _require_config(snapshot, what=f"hub snapshot of {raw!r} at {str(snapshot)!r}")
        return snapshot
    raise FileNotFoundError(
        f"checkpoint {raw!r} not found: it is not an existing directory, and not a hub id of the "
        "form 'owner/name'"
    )


def read_config(ckpt_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``config.json`` of a checkpoint directory as a dict."""
    path = Path(ckpt_dir) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in checkpoint directory {str(ckpt_dir)!r}")
    config = _read_json(path)
    if not isinstance(config, dict):
        raise CheckpointError(f"{str(path)!r} must hold a JSON object, got {type(config).__name__}")
    return config


def checkpoint_files(ckpt_dir: str | os.PathLike[str]) -> list[Path]:
    """The weight files of a checkpoint directory, in a stable order.

    ``model.safetensors``; else the shards listed in ``model.safetensors.index.json``
    (``weight_map`` values, deduplicated, in order of first appearance); else the same two for
    ``pytorch_model.bin``. Raises ``FileNotFoundError`` naming a listed shard that is missing,
    or listing what was looked for when the directory holds no weights at all.
    """
    root = Path(ckpt_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(ckpt_dir)!r} does not exist")
    for name in _WEIGHT_LAYOUTS:
        path = root / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [path]
        shards = [root / shard for shard in index_shards(path)]
        missing = [str(s.name) for s in shards if not s.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} shard file(s) listed in {str(path)!r} are missing: {format_list(missing)}"
            )
        return shards
    present = sorted(p.name for p in root.iterdir())
    raise FileNotFoundError(
        f"no weights found in {str(root)!r}: looked for {', '.join(_WEIGHT_LAYOUTS)}. "
        f"Files present: {format_list(present) or '(none)'}"
    )


def index_shards(index_path: Path) -> list[str]:
    """Shard file names of a ``*.index.json`` (``weight_map`` values, deduplicated, ordered)."""
    index = _read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(
            f"{str(index_path)!r} has no 'weight_map' object mapping tensor names to shard files"
        )
    shards: dict[str, None] = {}
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise CheckpointError(
                f"{str(index_path)!r}: weight_map[{key!r}] = {shard!r} is not a shard file name "
                "inside the checkpoint directory"
            )
        shards[shard] = None
    return list(shards)


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{str(path)!r} is not UTF-8 text: {e}") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{str(path)!r} is not valid JSON: {e}") from e


def _require_config(directory: Path, *, what: str) -> None:
    if not (directory / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{what} has no {CONFIG_NAME}")


# --- hub -------------------------------------------------------------------------------------


def _hub_snapshot(repo_id: str, revision: str | None) -> Path:
    """Fetch (or find in the cache) config, tokenizer files and weights of a hub repo."""
    snapshot = _snapshot(repo_id, revision, _METADATA_PATTERNS + _SAFETENSORS_PATTERNS)
    if (snapshot / SAFE_WEIGHTS_NAME).is_file():
        return snapshot
    if (snapshot / SAFE_INDEX_NAME).is_file():
        # An index may name shards outside the "model-*.safetensors" pattern: fetch those too.
        missing = [s for s in index_shards(snapshot / SAFE_INDEX_NAME) if not (snapshot / s).is_file()]
        return _snapshot(repo_id, revision, missing) if missing else snapshot
    # No safetensors in the repo: older uploads only have pytorch_model*.bin.
    return _snapshot(repo_id, revision, _METADATA_PATTERNS + _BIN_PATTERNS)


def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or env.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _snapshot(repo_id: str, revision: str | None, patterns: list[str]) -> Path:
    """``snapshot_download``, falling back to the local cache when the network fails."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.utils import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    where = f"hub id {repo_id!r}" + (f" (revision {revision!r})" if revision else "")
    reason = "HF_HUB_OFFLINE is set"
    if not _offline():
        try:
            return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
        except RevisionNotFoundError as e:
            raise FileNotFoundError(f"{where}: revision not found on the Hugging Face Hub ({e})") from e
        except RepositoryNotFoundError as e:
            raise FileNotFoundError(
                f"{where} not found on the Hugging Face Hub (it does not exist, or it is private / "
                f"gated and no valid token was given): {e}"
            ) from e
        except Exception as e:  # network down, hub down, proxy error ...: try the local cache
            reason = f"{type(e).__name__}: {e}"
    try:
        return Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=True)
        )
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(
            f"{where} was not found locally (HF cache {constants.HF_HUB_CACHE!r}) and no network is "
            f"available ({reason}). Download it once with network access, or pass a local "
            f"checkpoint directory. Details: {e}"
        ) from e
