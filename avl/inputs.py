"""Checks of what a user hands to `avl.generate` and `avl.load`: each bad value gets a `ValueError`
naming it and what is allowed, before any work starts (instead of an IndexError, a RuntimeError from
deep inside a vision tower, or torch's AssertionError for a missing CUDA build)."""

from __future__ import annotations

import numbers
from typing import Any, NoReturn

import torch
from torch import Tensor, nn

from avl.cache.policies import FeaturePolicy, Policy

__all__ = ["check_device", "check_generate_inputs", "check_policy"]


def _fail(name: str, value: object, allowed: str) -> NoReturn:
    raise ValueError(f"{name}={value!r} is invalid; allowed: {allowed}")


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_device(device: torch.device | str) -> torch.device:
    """The `torch.device` named by `device`; raises ValueError for a malformed name and for a CUDA
    device on a build or machine without CUDA (torch itself fails later with an AssertionError)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device={device!r} is not a device name; allowed: e.g. 'cpu', 'cuda', 'cuda:1' "
                         f"({error})") from error
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            build = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise ValueError(f"device={device!r} is not available: {build} (torch {torch.__version__}); "
                             "allowed: 'cpu'")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r} is not available; allowed: cuda:0 .. "
                             f"cuda:{torch.cuda.device_count() - 1}")
    return parsed


def check_policy(model: nn.Module, policy: object, feature_policy: object = None) -> None:
    """Raise unless `policy` is a `Policy` and `feature_policy` a `FeaturePolicy` (or None) that can
    run on `model`: every layer they name exists, and their kinds fit the model (Trim needs
    cross-attention layers; image-row policies need image rows in the sequence). A policy named alone
    (`--policy trim`) goes through `split_policy` first."""
    if isinstance(policy, FeaturePolicy):
        raise TypeError(f"policy={policy!r} selects image features: pass it as feature_policy=..., with the "
                        "sequence policy (default Full()) as policy=...")
    if not isinstance(policy, Policy):
        _fail("policy", policy, f"a Policy instance such as avl.Full(), avl.AVL(...), avl.FastV(...), not a "
                                f"{type(policy).__name__}")
    if feature_policy is not None and not isinstance(feature_policy, FeaturePolicy):
        _fail("feature_policy", feature_policy, f"a FeaturePolicy such as avl.Trim(...) or None, not a "
                                                f"{type(feature_policy).__name__}")
    own = getattr(model, "check_policy", None)  # a wrapper that applies a feature policy itself (LLaVA: VisionZip)
    language_model = getattr(model, "language_model", None)
    if own is not None:
        own(policy, feature_policy)
    elif language_model is not None:
        language_model.check_policy(policy, feature_policy)


def _check_attention_mask(mask: Tensor, shape: tuple[int, ...]) -> None:
    if not isinstance(mask, Tensor):
        _fail("attention_mask", type(mask).__name__, f"a tensor of shape {shape}")
    if tuple(mask.shape) != shape:
        _fail("attention_mask", f"shape {tuple(mask.shape)}", f"shape {shape} (that of input_ids)")
    if mask.is_floating_point() or mask.is_complex():
        _fail("attention_mask", f"dtype {mask.dtype}", "an integer or bool tensor of 0 (padding) and 1")
    values = mask.long()
    odd = (values != 0) & (values != 1)
    if bool(odd.any()):
        row, col = (int(i) for i in odd.nonzero()[0])
        raise ValueError(f"attention_mask holds {int(values[row, col])} at sample {row}, position {col}; "
                         "allowed: 0 (padding) and 1 (token)")
    empty = values.sum(-1) == 0
    if bool(empty.any()):
        raise ValueError(f"attention_mask of sample {int(empty.nonzero()[0])} is all 0 (an empty prompt); "
                         "allowed: at least one 1 per sample")
    # left padding: once a row has a 1, it stays 1 to the end
    hole = (values.cummax(-1).values == 1) & (values == 0)
    if bool(hole.any()):
        row, col = (int(i) for i in hole.nonzero()[0])
        first = int(values[row].argmax())
        where = "right padding" if bool((values[row, col:] == 0).all()) else "a hole inside the prompt"
        raise ValueError(f"attention_mask of sample {row} has a 0 at position {col} after its first 1 at position "
                         f"{first} ({where}); allowed: left padding only (0s, then 1s to the end)")


def _check_token_ids(input_ids: Tensor, model: nn.Module) -> None:
    """Every id must have an embedding row, but the image placeholder id (`config.image_token_index`),
    which a model overwrites with image features and never embeds."""
    embedding = getattr(getattr(model, "language_model", None), "embed_tokens", None)
    rows = embedding.num_embeddings if isinstance(embedding, nn.Embedding) else None
    outside = input_ids < 0 if rows is None else (input_ids < 0) | (input_ids >= rows)
    image_id = getattr(getattr(model, "config", None), "image_token_index", None)
    if isinstance(image_id, int):
        outside &= input_ids != image_id
    if bool(outside.any()):
        row, col = (int(i) for i in outside.nonzero()[0])
        allowed = "ids >= 0" if rows is None else f"ids in [0, {rows}) (the model's embedding rows)"
        raise ValueError(f"input_ids hold {int(input_ids[row, col])} at sample {row}, position {col} "
                         f"({int(outside.sum())} id(s) out of range); allowed: {allowed}")


def check_generate_inputs(
    model: nn.Module,
    input_ids: Any,
    attention_mask: Any,
    pixel_values: Any,
    policy: object,
    feature_policy: object,
    max_new_tokens: Any,
    temperature: Any,
    top_p: Any,
) -> None:
    """Raise ValueError for the first bad argument of `avl.generate`, naming it and what is allowed.

    input_ids: an integer tensor [batch, length > 0] of ids the model embeds; attention_mask (None:
    no padding): of the same shape, 0/1, left padding only, at least one token per sample; pixel_values: a
    floating tensor or None (its shape is checked by the model's vision tower); policy: a `Policy`
    that fits the model (`check_policy`); max_new_tokens: an int >= 1; temperature: a number > 0;
    top_p: a number in (0, 1]. Booleans are not numbers here.
    """
    if not isinstance(input_ids, Tensor):
        _fail("input_ids", type(input_ids).__name__, "a [batch, length] integer tensor")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        _fail("input_ids", f"shape {tuple(input_ids.shape)}", "a [batch, length] tensor with length >= 1")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        _fail("input_ids", f"dtype {input_ids.dtype}", "an integer tensor")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        _fail("max_new_tokens", max_new_tokens, "an integer >= 1")
    if not _is_real(temperature) or not temperature > 0:
        _fail("temperature", temperature, "a number > 0")
    if not _is_real(top_p) or not 0 < top_p <= 1:
        _fail("top_p", top_p, "a number in (0, 1]")
    if attention_mask is not None:
        _check_attention_mask(attention_mask, tuple(input_ids.shape))
    _check_token_ids(input_ids, model)
    if pixel_values is not None and (not isinstance(pixel_values, Tensor) or not pixel_values.is_floating_point()):
        shown = f"dtype {pixel_values.dtype}" if isinstance(pixel_values, Tensor) else type(pixel_values).__name__
        _fail("pixel_values", shown, "a floating-point tensor (the processor's output), or None")
    check_policy(model, policy, feature_policy)
