"""lmms-eval model ``avl``: any avl checkpoint under any avl cache policy, inside lmms-eval.

    pip install -e '.[lmms-eval]' -c tests/integrations/lmms-eval-constraints.txt   # README, "lmms-eval"
    python -m lmms_eval --model avl --tasks docvqa_val \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,policy=avl,secondary=0.45,core=0.30,refresh_every=3,dtype=float16

Registered through lmms-eval's entry-point group ``lmms_eval.models`` (``manifest``), so no lmms-eval
code is edited. ``--model_args``: ``pretrained`` (a checkpoint directory or hub id), ``policy`` (a name
of ``avl.cache.registry.POLICIES``, default ``full``) and that policy's fields by their dataclass names,
with the values `avl.cache.registry.parse_value` reads (a tuple's items separated by ``/``, since
``,`` separates model_args); plus the ``ModelArgs`` fields below. lmms-eval's ``--batch_size`` and
``--device`` arrive as ``batch_size`` / ``device``.

What each request becomes, as ``avl eval`` runs the same sample (``avl.eval.runner``):

* prompt: the task's text (lmms-eval's ``doc_to_text``) in the family's template of
  ``avl.families`` (taken from lmms-eval's own wrappers), with as many image placeholders as
  ``doc_to_visual`` gives images, placed as the wrapper places several (``MULTI_IMAGE``);
* ``generate_until``: ``avl.generate`` under the policy; greedy unless ``temperature > 0`` (then
  sampling with ``top_p``, seeded by ``seed``), ``max_new_tokens`` from the task (else ``ModelArgs``);
  the output cut at EOS, decoded, and post-processed as the family's lmms-eval wrapper does
  (``Family.postprocess``: strip / cut at ``until``). Requests with the same generation settings
  run in left-padded batches of ``batch_size``;
* ``loglikelihood`` (multiple-choice tasks): the continuation is appended to the prompt; the prompt is
  prefilled under the policy (its prefill part, A-VL's P / FastV, and the cache it compacts), then each
  continuation token is fed through the policy's decode steps, as if generated. Returned:
  ``(mean negative log-likelihood per continuation token, greedy)``: lmms-eval's wrappers return
  this loss and its ``multiple_choice`` scoring takes the argmin; ``greedy`` says whether greedy
  decoding under the policy produces exactly the continuation's tokens.

Differences from lmms-eval's own wrappers, on purpose: the continuation is scored as plain text after
the generation prompt (the llava wrapper puts it into the assistant turn, with the turn's closing
separator); the task's prompt kwargs are chosen by the ``--model`` name, i.e. ``avl`` -> ``default``
(``avl eval`` picks the family's entry, e.g. Qwen-VL's ``" Answer:"``); a single process (use
``avl eval`` under torchrun for data parallelism); requests without an image, with video/audio, or
with ``num_beams > 1`` raise ``ValueError`` naming them.

Without lmms-eval installed the module still imports (``LmmsBase`` is then a stand-in with the
attributes lmms-eval's ``lmms`` gives a model: ``task_dict``, ``rank``, ``world_size``), so the adapter
runs on recorded requests in the tests.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from PIL import Image

from avl.cache.policies import FeaturePolicy, Policy, split_policy
from avl.cache.registry import POLICIES, field_types, parse_value, policy_class
from avl.families import Family
from avl.eval.runner import DTYPES, load_for_eval
from avl.generate import Generative, generate
from avl.inputs import check_policy

try:
    from lmms_eval.api.instance import GenerationResult
    from lmms_eval.api.model import lmms as LmmsBase
except ImportError:  # lmms-eval is optional: a stand-in with what the adapter uses of the base class
    GenerationResult = None

    class LmmsBase:  # type: ignore[no-redef]
        """What ``lmms_eval.api.model.lmms`` gives a model: the evaluator's datasets, rank, world size."""

        is_simple = True

        def __init__(self) -> None:
            self.task_dict: dict[str, Any] = {}
            self._rank, self._world_size = 0, 1

        @property
        def rank(self) -> int:
            return self._rank

        @property
        def world_size(self) -> int:
            return self._world_size


__all__ = ["MULTI_IMAGE", "AvlLmms", "GenerationSettings", "ModelArgs", "manifest", "parse_model_args", "prompt_for"]

MODEL_ID = "avl"


@dataclass(frozen=True)
class ModelArgs:
    """The adapter's own ``--model_args`` (besides ``policy`` and its fields).

    ``max_new_tokens``: for tasks whose generation_kwargs set none (lmms-eval's llava wrapper's 1024);
    ``family``: overrides config.json's ``model_type`` for the prompt rules; ``seed``: of the sampling
    generator (tasks with ``temperature > 0``); ``device``: default ``cuda`` when available, else ``cpu``.
    """

    pretrained: str
    dtype: str = "float32"
    device: str | None = None
    batch_size: int = 1
    max_new_tokens: int = 1024
    compile: bool = False
    family: str | None = None
    seed: int = 0
    max_batch_size: int | None = None  # lmms-eval passes --max_batch_size; only None is accepted

    def __post_init__(self) -> None:
        checks = [
            ("dtype", self.dtype in DTYPES, ", ".join(DTYPES)),
            ("batch_size", self.batch_size >= 1, "an integer >= 1"),
            ("max_new_tokens", self.max_new_tokens >= 1, "an integer >= 1"),
            ("max_batch_size", self.max_batch_size is None, "unset (batch_size 'auto' is not supported)"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"model_args {name}={getattr(self, name)!r} is invalid; allowed: {allowed}")


def parse_model_args(args: Mapping[str, Any]) -> tuple[ModelArgs, Policy | FeaturePolicy]:
    """lmms-eval's parsed ``--model_args`` (values already turned into bool / int / float / str by
    lmms-eval) -> the adapter's arguments and the policy. Every value is read back from its text with
    the registry's ``parse_value`` against the field's annotation, so the syntax is the CLI's."""
    own = field_types(ModelArgs)
    name = str(args.get("policy", "full"))
    kinds = field_types(policy_class(name))
    values: dict[str, Any] = {}
    fields: dict[str, Any] = {}
    for key, value in args.items():
        if key == "policy":
            continue
        text = _text(value)
        if key in own:
            values[key] = parse_value(own[key], text, key, tuple_sep="/")
        elif key in kinds:
            fields[key] = parse_value(kinds[key], text, key, tuple_sep="/")
        else:
            owners = [p for p, cls in POLICIES.items() if key in field_types(cls)]
            where = f" (a field of policy {', '.join(owners)}, not of policy {name})" if owners else ""
            raise ValueError(f"model_args {key}={value!r} is unknown{where}; allowed: {', '.join(own)}, policy, "
                             f"and the fields of policy {name}: {', '.join(kinds) or 'none'}")
    if "pretrained" not in values:
        raise ValueError("model_args needs pretrained=<checkpoint directory or hub id>")
    return ModelArgs(**values), policy_class(name)(**fields)


def _text(value: Any) -> str:
    """lmms-eval's value back as the text the user wrote (``true`` -> True -> ``"true"``)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


# one image placeholder of the family's single-image prompt -> the text lmms-eval's wrapper puts for n images
_LLAVA_IMAGES = ("<image>\n", lambda n: " ".join(["<image>"] * n) + "\n")  # llava / llava_onevision wrappers
_QWEN2_VL_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
MULTI_IMAGE: dict[str, tuple[str, Callable[[int], str]]] = {
    "llava": _LLAVA_IMAGES,
    "llava_next": _LLAVA_IMAGES,
    "llava_onevision": _LLAVA_IMAGES,
    "mllama": ("<|image|>", lambda n: "<|image|>" * n),  # one {"type": "image"} part per image, then the text
    "qwen": ("Picture 1: <img></img>\n", lambda n: "".join(f"Picture {i}: <img></img>\n" for i in range(1, n + 1))),
    "qwen2_vl": (_QWEN2_VL_IMAGE, lambda n: _QWEN2_VL_IMAGE * n),  # the images' content parts before the text
    "qwen2_5_vl": (_QWEN2_VL_IMAGE, lambda n: _QWEN2_VL_IMAGE * n),
}


def prompt_for(family: Family, text: str, n_images: int) -> str:
    """The family's prompt for the task text with ``n_images`` images (``Family.prompt`` for one)."""
    if n_images < 1:
        raise ValueError(f"a request has {n_images} images; allowed: at least one (avl's models are prompted "
                         "with images)")
    prompt = family.prompt(text)
    if n_images == 1:
        return prompt
    if family.model_type not in MULTI_IMAGE:
        raise ValueError(f"a request has {n_images} images, but model_type {family.model_type!r} has no multi-image "
                         f"prompt rule; allowed: 1 image, or a family of {', '.join(MULTI_IMAGE)}")
    placeholder, several = MULTI_IMAGE[family.model_type]
    if prompt.count(placeholder) != 1:
        raise ValueError(f"the {family.model_type} prompt holds {placeholder!r} {prompt.count(placeholder)} times "
                         f"(the task text has its own?); allowed: exactly once, to place {n_images} images")
    return prompt.replace(placeholder, several(n_images), 1)


@dataclass(frozen=True)
class GenerationSettings:
    """A task's ``generation_kwargs`` as ``avl.generate`` takes them; requests with equal settings batch."""

    max_new_tokens: int
    until: tuple[str, ...]
    do_sample: bool
    temperature: float
    top_p: float

    KNOWN = ("max_new_tokens", "until", "temperature", "top_p", "do_sample", "num_beams", "image_aspect_ratio")

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any], default_max_new_tokens: int) -> GenerationSettings:
        """lmms-eval's rules: sampling iff ``temperature > 0`` (``do_sample`` follows it); ``until`` a
        string or a list; ``image_aspect_ratio`` is the llava wrapper's and is ignored (the processor
        follows the checkpoint); other keys, and ``num_beams > 1``, raise."""
        unknown = sorted(set(kwargs) - set(cls.KNOWN))
        if unknown:
            raise ValueError(f"generation_kwargs {unknown} are not supported; allowed: {', '.join(cls.KNOWN)}")
        if (kwargs.get("num_beams") or 1) != 1:
            raise ValueError(f"generation_kwargs num_beams={kwargs['num_beams']!r} is not supported; allowed: 1")
        until = kwargs.get("until", ())
        if isinstance(until, str):
            until = (until,)
        if not isinstance(until, (list, tuple)) or not all(isinstance(u, str) for u in until):
            raise ValueError(f"generation_kwargs until={until!r} is invalid; allowed: a string or a list of strings")
        temperature = float(kwargs.get("temperature") or 0.0)
        top_p = kwargs.get("top_p")
        return cls(max_new_tokens=int(kwargs.get("max_new_tokens") or default_max_new_tokens), until=tuple(until),
                   do_sample=temperature > 0, temperature=temperature if temperature > 0 else 1.0,
                   top_p=1.0 if top_p is None else float(top_p))


class AvlLmms(LmmsBase):
    """The lmms-eval model: see the module docstring. ``AvlLmms(pretrained=..., policy=..., ...)``
    takes the ``--model_args`` keys (``parse_model_args``)."""

    is_simple = True

    def __init__(self, **model_args: Any) -> None:
        super().__init__()
        self.args, policy = parse_model_args(model_args)
        world = os.environ.get("WORLD_SIZE", "1")
        if world != "1":  # every process would answer every request
            raise ValueError(f"WORLD_SIZE={world!r}: the avl lmms-eval model runs in one process; allowed: 1 "
                             "(shard samples with `torchrun -m avl.eval` instead)")
        self.policy, self.feature_policy = split_policy(policy)
        device = self.args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.loaded = load_for_eval(self.args.pretrained, self.args.dtype, device, self.args.family)
        check_policy(self.loaded.model, self.policy, self.feature_policy)  # before the first request
        self.model = cast(Generative, self.loaded.model)
        self.eos = self.loaded.processor.tokenizer.eos_token_id
        self.param_dtype = next(self.loaded.model.parameters()).dtype
        self.generator = torch.Generator(device=device).manual_seed(self.args.seed)

    @property
    def batch_size(self) -> int:
        return self.args.batch_size

    @property
    def device(self) -> str:
        return self.loaded.device

    # -- requests -------------------------------------------------------------------------------

    def _doc(self, task: str, split: str, doc_id: int) -> Any:
        return self.task_dict[task][split][doc_id]

    def _images(self, doc_to_visual: Callable[[Any], Any], doc: Any, where: str) -> list[Image.Image]:
        visuals = doc_to_visual(doc) or []
        visuals = visuals if isinstance(visuals, (list, tuple)) else [visuals]
        images = [v for group in visuals for v in (group if isinstance(group, (list, tuple)) else [group])]
        for v in images:
            if not isinstance(v, Image.Image):
                raise ValueError(f"{where}: doc_to_visual gave a {type(v).__name__}; allowed: PIL images "
                                 "(avl runs image tasks, not video or audio)")
        return [im.convert("RGB") for im in images]

    def _inputs(self, prompts: Sequence[str], images: Sequence[Sequence[Image.Image]]) -> dict[str, torch.Tensor]:
        inputs = {k: v.to(self.loaded.device) for k, v in self.loaded.processor(prompts, list(images)).items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.param_dtype)
        return inputs

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """One answer per request ``(context, generation_kwargs, doc_to_visual, doc_id, task, split)``."""
        jobs: dict[GenerationSettings, list[tuple[int, str, list[Image.Image]]]] = {}
        for i, request in enumerate(requests):
            context, kwargs, doc_to_visual, doc_id, task, split = _unpack(request, 6, "generate_until")
            where = f"request {i} (task {task}, doc {doc_id})"
            images = self._images(doc_to_visual, self._doc(task, split, doc_id), where)
            settings = GenerationSettings.from_kwargs(kwargs or {}, self.args.max_new_tokens)
            jobs.setdefault(settings, []).append((i, prompt_for(self.loaded.family, context, len(images)), images))
        answers: list[str | None] = [None] * len(requests)
        for settings, items in jobs.items():
            for batch in _chunks(items, self.args.batch_size):
                for (i, _, _), answer in zip(batch, self._generate(settings, batch), strict=True):
                    answers[i] = answer
        return cast(list[str], answers)

    def _generate(self, settings: GenerationSettings, batch: Sequence[tuple[int, str, list[Image.Image]]]) -> list[str]:
        inputs = self._inputs([p for _, p, _ in batch], [images for _, _, images in batch])
        out = generate(self.model, **inputs, policy=self.policy, feature_policy=self.feature_policy,
                       max_new_tokens=settings.max_new_tokens, do_sample=settings.do_sample,
                       temperature=settings.temperature, top_p=settings.top_p, eos_token_id=self.eos,
                       pad_token_id=self.loaded.processor.pad_token_id, compile=self.args.compile,
                       generator=self.generator if settings.do_sample else None)
        texts = []
        for row in out.tokens.tolist():
            ids = row[:row.index(self.eos)] if self.eos in row else row
            texts.append(self.loaded.family.postprocess(self.loaded.processor.decode(ids), settings.until))
        return texts

    def loglikelihood(self, requests: Sequence[Any]) -> list[Any]:
        """``(mean negative log-likelihood of the continuation's tokens, greedy)`` per request
        ``(context, continuation or doc_to_target, doc_to_visual, doc_id, task, split)``, wrapped
        for lmms-eval's evaluator when it is installed (``_through_evaluator``)."""
        results = []
        for i, request in enumerate(requests):
            context, target, doc_to_visual, doc_id, task, split = _unpack(request, 6, "loglikelihood")
            where = f"request {i} (task {task}, doc {doc_id})"
            doc = self._doc(task, split, doc_id)
            continuation = target if isinstance(target, str) else target(doc)
            if not isinstance(continuation, str) or not continuation:
                raise ValueError(f"{where}: the continuation is {continuation!r}; allowed: a non-empty string")
            images = self._images(doc_to_visual, doc, where)
            results.append(self._continuation_loss(prompt_for(self.loaded.family, context, len(images)),
                                                   continuation, images, where))
        return [_through_evaluator(pair) for pair in results]

    @torch.inference_mode()
    def _continuation_loss(self, prompt: str, continuation: str, images: list[Image.Image],
                           where: str) -> tuple[float, bool]:
        inputs = self._inputs([prompt], [images])
        whole = self.loaded.processor([prompt + continuation], [images])["input_ids"][0].tolist()
        n_prompt = inputs["input_ids"].shape[1]
        if whole[:n_prompt] != inputs["input_ids"][0].tolist():
            raise ValueError(f"{where}: the tokens of prompt + {continuation!r} do not start with the prompt's "
                             "tokens (the tokenizer merges across the boundary); allowed: a continuation that "
                             "starts a new token, e.g. with a space")
        tokens = torch.tensor(whole[n_prompt:], device=self.loaded.device)
        if len(tokens) == 0:
            raise ValueError(f"{where}: the continuation {continuation!r} has no tokens")
        input_ids, attention_mask, pixel_values = (inputs.pop(k) for k in ("input_ids", "attention_mask",
                                                                            "pixel_values"))
        logits, cache = self.model.prefill(input_ids, attention_mask, pixel_values, self.policy, len(tokens) - 1,
                                           feature_policy=self.feature_policy, **inputs)
        total, greedy = 0.0, True
        for t, token in enumerate(tokens):
            logprobs = torch.log_softmax(logits[0].double(), dim=-1)
            total += float(logprobs[token])
            greedy = greedy and int(logprobs.argmax()) == int(token)
            if t < len(tokens) - 1:
                logits = self.model.decode(token.view(1), cache, cache.next_step())
        return -total / len(tokens), greedy

    def generate_until_multi_round(self, requests: Sequence[Any]) -> list[str]:
        raise NotImplementedError("the avl lmms-eval model answers single-round tasks (generate_until, "
                                  "loglikelihood); multi-round tasks are not supported")


def _through_evaluator(pair: tuple[float, bool]) -> Any:
    """A loglikelihood answer as lmms-eval 0.7.3's evaluator keeps it: it passes every response
    through ``unwrap_generation_output``, which turns a ``(float, bool)`` tuple into its ``str`` (its
    multiple-choice scoring then fails with "too many values to unpack") but hands a
    ``GenerationResult``'s ``text`` on unchanged. Without lmms-eval: the tuple itself."""
    return pair if GenerationResult is None else GenerationResult(text=cast(str, pair))


def _unpack(request: Any, size: int, kind: str) -> tuple[Any, ...]:
    args = tuple(request.args)
    if len(args) != size:
        raise ValueError(f"a {kind} request has {len(args)} arguments {args!r}; "
                         f"allowed: {size} (context, ..., doc_to_visual, doc_id, task, split); requests without "
                         "images (e.g. acc_mutual_info's) are not supported")
    return args


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    return (items[k:k + size] for k in range(0, len(items), size))


def manifest() -> Any:
    """The entry point of group ``lmms_eval.models`` (pyproject.toml): model ``avl`` -> ``AvlLmms``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.{AvlLmms.__name__}")

