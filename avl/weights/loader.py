"""Load a checkpoint directory into a model built on the meta device, without a second copy.

Usage (per family: a config parser, a model class, a ``KeyMap`` and the tied names)::

    with torch.device("meta"):
        model = Llava(cfg)
    load_checkpoint(model, ckpt_dir, LLAVA_KEYS, dtype=torch.bfloat16, device="cuda",
                    tied={"lm_head.weight": "embed_tokens.weight"} if cfg.tie_word_embeddings else None)

Tensors are memory-mapped from the files (see ``readers``); a tensor is only copied when it has
to be cast to ``dtype`` or moved to another device, and ``load_state_dict(assign=True)`` makes
those tensors the model's parameters.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextlib import ExitStack

import torch
from torch import nn

from avl.weights.errors import CheckpointError, format_list
from avl.weights.files import checkpoint_files
from avl.weights.keymap import KeyMap
from avl.weights.readers import TensorFile, iter_keys, open_tensor_file

__all__ = ["KeyMap", "load_checkpoint", "read_checkpoint"]

Shape = tuple[int, ...]


def read_checkpoint(
    ckpt_dir: str | os.PathLike[str],
    key_map: KeyMap | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory under their renamed keys (ignored keys dropped).

    Same-dtype CPU tensors stay memory-mapped. Floating-point tensors are cast to ``dtype``
    when it is given and differs; integer / bool tensors are never cast. Raises
    ``CheckpointError`` if two checkpoint keys map to the same name.
    """
    key_map = key_map or KeyMap()
    with ExitStack() as stack:
        files = [open_tensor_file(p, stack) for p in checkpoint_files(ckpt_dir)]
        sources, _ = _rename_all(files, key_map, ckpt_dir)
        return {name: _materialize(f, key, dtype, device) for name, (f, key) in sources.items()}


def load_checkpoint(
    model: nn.Module,
    ckpt_dir: str | os.PathLike[str],
    key_map: KeyMap,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    tied: Mapping[str, str] | None = None,
) -> nn.Module:
    """Load the checkpoint in ``ckpt_dir`` into ``model`` (built on the meta device); return it.

    Every checkpoint key is renamed with ``key_map``; the result must match ``model.state_dict()``
    exactly (names and shapes), else one ``CheckpointError`` lists the missing, unexpected and
    mis-shaped keys. Floating-point tensors are cast to ``dtype`` only when it is given and
    differs from the stored dtype (``None`` keeps the checkpoint's dtypes); same-dtype CPU loads
    stay memory-mapped (zero-copy). Tensors are moved to ``device`` and assigned with
    ``load_state_dict(strict=True, assign=True)``.

    ``tied`` maps target -> source parameter names (``{"lm_head.weight":
    "model.embed_tokens.weight"}`` when ``tie_word_embeddings``): the target may be absent from
    the checkpoint, and after loading it *is* the source ``Parameter``. As in transformers, a
    copy of a tied target that the checkpoint does hold is shape-checked and then not used.

    Raises ``CheckpointError`` if a parameter or buffer is still on the meta device afterwards
    (e.g. a non-persistent buffer that the model did not compute itself).
    """
    tied = dict(tied or {})
    expected: dict[str, Shape] = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    bad_tied = [
        f"{t!r} <- {s!r}"
        for t, s in tied.items()
        if t not in expected or s not in expected or s in tied or t == s
    ]
    if bad_tied:
        raise ValueError(
            f"tied must map target -> source, both keys of {type(model).__name__}.state_dict(), "
            f"a source never itself a target: {format_list(bad_tied)}"
        )

    with ExitStack() as stack:
        files = [open_tensor_file(p, stack) for p in checkpoint_files(ckpt_dir)]
        sources, renamed_from = _rename_all(files, key_map, ckpt_dir)
        _validate(model, ckpt_dir, expected, sources, renamed_from, tied)
        state = {
            name: _materialize(f, key, dtype, device)
            for name, (f, key) in sources.items()
            if name not in tied
        }
    for target, source in tied.items():
        state[target] = state[source]  # same tensor: strict loading sees every key

    model.load_state_dict(state, strict=True, assign=True)
    for target, source in tied.items():
        _retie(model, target, source)
    _check_not_meta(model)
    return model


def _rename_all(
    files: list[TensorFile], key_map: KeyMap, ckpt_dir: str | os.PathLike[str]
) -> tuple[dict[str, tuple[TensorFile, str]], dict[str, str]]:
    """Model name -> (file, checkpoint key); and model name -> checkpoint key where renamed."""
    sources: dict[str, tuple[TensorFile, str]] = {}
    renamed_from: dict[str, str] = {}
    clashes: list[str] = []
    for key, f in iter_keys(files):
        name = key_map.rename(key)
        if name is None:
            continue
        if name in sources:
            other_file, other_key = sources[name]
            clashes.append(f"{name!r} <- {other_key!r} ({other_file.path.name}) and {key!r} ({f.path.name})")
            continue
        sources[name] = (f, key)
        if name != key:
            renamed_from[name] = key
    if clashes:
        raise CheckpointError(
            f"checkpoint {str(ckpt_dir)!r}: {len(clashes)} model name(s) given by more than one "
            f"checkpoint tensor (duplicate keys across shards, or two layouts mixed): "
            f"{format_list(clashes)}"
        )
    return sources, renamed_from


def _validate(
    model: nn.Module,
    ckpt_dir: str | os.PathLike[str],
    expected: dict[str, Shape],
    sources: dict[str, tuple[TensorFile, str]],
    renamed_from: dict[str, str],
    tied: dict[str, str],
) -> None:
    """Raise one ``CheckpointError`` listing every missing, unexpected and mis-shaped key."""

    def label(name: str) -> str:
        return f"{name} (checkpoint key {renamed_from[name]})" if name in renamed_from else name

    missing = [k for k in expected if k not in sources and k not in tied]
    unexpected = [k for k in sources if k not in expected]
    mismatched: list[tuple[str, Shape, Shape]] = []
    for name, (f, key) in sources.items():
        if name in expected:
            shape = f.shape(key)
            if shape != expected[name]:
                mismatched.append((name, shape, expected[name]))
    if not (missing or unexpected or mismatched):
        return

    lines = [f"checkpoint {str(ckpt_dir)!r} does not match {type(model).__name__}:"]
    if missing:
        lines.append(
            f"  {len(missing)} missing key(s) (model parameters with no checkpoint tensor): "
            f"{format_list(missing)}"
        )
    if unexpected:
        lines.append(
            f"  {len(unexpected)} unexpected key(s) (checkpoint tensors with no model parameter, "
            f"after renaming): {format_list([label(k) for k in unexpected])}"
        )
    if mismatched:
        shown = [f"{label(n)}: checkpoint {list(c)} vs model {list(m)}" for n, c, m in mismatched]
        lines.append(f"  {len(mismatched)} mis-shaped key(s): {format_list(shown)}")
    raise CheckpointError("\n".join(lines), missing=missing, unexpected=unexpected, mismatched=mismatched)


def _materialize(
    f: TensorFile, key: str, dtype: torch.dtype | None, device: torch.device | str
) -> torch.Tensor:
    """Read one tensor (mmap-backed); copy only to cast floating point or change device."""
    tensor = f.get(key)
    if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    return tensor.to(device)


def _retie(model: nn.Module, target: str, source: str) -> None:
    """Make ``target`` the very same ``Parameter`` object as ``source``."""
    module_name, _, attr = target.rpartition(".")
    module = model.get_submodule(module_name)
    try:
        value: torch.Tensor = model.get_parameter(source)
    except AttributeError:
        value = model.get_buffer(source)
    if attr in module._parameters:
        module._parameters[attr] = value  # type: ignore[assignment]
    elif attr in module._buffers:
        module._buffers[attr] = value
    else:
        setattr(module, attr, value)


def _check_not_meta(model: nn.Module) -> None:
    left = [
        name
        for name, t in [
            *model.named_parameters(remove_duplicate=False),
            *model.named_buffers(remove_duplicate=False),
        ]
        if t.is_meta
    ]
    if left:
        raise CheckpointError(
            f"after loading, {len(left)} parameter(s)/buffer(s) of {type(model).__name__} are still on "
            f"the meta device (not in its state_dict, e.g. non-persistent buffers; compute them in "
            f"forward or register them persistent): {format_list(left)}"
        )
