"""Qwen-VL / Qwen-VL-Chat input processing: image transform, tiktoken tokenizer, chat format, processor.

Facts from the original remote code (Qwen/Qwen-VL-Chat `visual.py`, `tokenization_qwen.py`,
`qwen_generation_utils.py`):

- image transform: `Resize((S, S), BICUBIC)` on the PIL image (PIL's own bicubic), `ToTensor`
  (uint8 / 255 in the float dtype), `Normalize` with the OpenAI CLIP mean / std; S = 448;
- tokenizer: tiktoken BPE from `qwen.tiktoken` (base64 token, space, rank per line) with Qwen's
  pre-tokenisation regex, text NFC-normalised; special tokens numbered from len(ranks) on in this
  order: `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, `<|extra_0|>` .. `<|extra_204|>`, `<ref>`,
  `</ref>`, `<box>`, `</box>`, `<quad>`, `</quad>`, `<img>`, `</img>`, `<imgpad>` (151643 ranks:
  `<img>` = 151857, `</img>` = 151858, `<imgpad>` = 151859);
- an image is `<img>PATH</img>` in the text; the original spells PATH's bytes into the 256 ids of
  the span and pads with `<imgpad>`. Here every span becomes `<img>` + 256 `<imgpad>` + `</img>`
  and the pixels travel separately (the PATH, if any, is where the processor loads the image from);
- chat (ChatML, `make_context`): `<|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{query}`
  `<|im_end|>\\n<|im_start|>assistant\\n`, each role and content encoded on its own (only the image
  tags are special inside them); a query with images reads `Picture 1: <img>PATH</img>\\n{question}`.
"""

from __future__ import annotations

import base64
import json
import os
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from avl.processing.image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageLike, load_image, to_8bit


TIKTOKEN_FILE = "qwen.tiktoken"
PAT_STR = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"""
           r"""\s+(?!\S)|\s+""")
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
IMG_START, IMG_END, IMG_PAD = "<img>", "</img>", "<imgpad>"
IMAGE_SPECIAL_TOKENS = ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", IMG_START, IMG_END, IMG_PAD)
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, *(f"<|extra_{i}|>" for i in range(205)), *IMAGE_SPECIAL_TOKENS)
IMAGE_SPAN = 256  # ids between <img> and </img> (the resampler's queries)
DEFAULT_SYSTEM = "You are a helpful assistant."


def load_tiktoken_ranks(path: str | os.PathLike[str]) -> dict[bytes, int]:
    """Read a tiktoken BPE file: one `base64(token) rank` per line -> {token bytes: rank}.

    Raises ValueError on a malformed line, and unless the ranks are exactly 0..n-1 (the
    special tokens are numbered from n on).
    """
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(Path(path).read_bytes().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        try:
            if len(parts) != 2:
                raise ValueError("not two fields")
            ranks[base64.b64decode(parts[0], validate=True)] = int(parts[1])
        except ValueError:  # binascii.Error is a ValueError
            raise ValueError(f"{str(path)!r} line {number}: expected 'base64-token rank', got {line[:60]!r}") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{str(path)!r}: the ranks of its {len(ranks)} tokens are not exactly 0..{len(ranks) - 1}")
    return ranks


class QwenTokenizer:
    """Qwen's tiktoken tokenizer with the special tokens at the ids the original assigns.

    Args:
        mergeable_ranks: {token bytes: rank}, ranks 0..n-1 (`load_tiktoken_ranks`).
        image_span: `<imgpad>` ids per `<img>...</img>` span (256; the config's visual.n_queries).
        errors: how `decode` treats invalid UTF-8 (`bytes.decode` errors).
    """

    def __init__(self, mergeable_ranks: dict[bytes, int], image_span: int = IMAGE_SPAN,
                 errors: str = "replace") -> None:
        import tiktoken  # optional dependency, only needed for Qwen

        if not isinstance(image_span, int) or image_span < 1:
            raise ValueError(f"image_span={image_span!r} is invalid; allowed: an integer >= 1")
        self.special_tokens = {token: len(mergeable_ranks) + i for i, token in enumerate(SPECIAL_TOKENS)}
        self.encoding = tiktoken.Encoding("Qwen", pat_str=PAT_STR, mergeable_ranks=mergeable_ranks,
                                          special_tokens=self.special_tokens)
        self.image_span = image_span
        self.errors = errors

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], image_span: int = IMAGE_SPAN) -> QwenTokenizer:
        if not Path(path).is_file():
            raise FileNotFoundError(f"tiktoken BPE file not found: {str(path)!r}")
        return cls(load_tiktoken_ranks(path), image_span=image_span)

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str], image_span: int = IMAGE_SPAN) -> QwenTokenizer:
        """Load `<path>/qwen.tiktoken` (the Qwen-VL checkpoint layout)."""
        return cls.from_file(Path(path) / TIKTOKEN_FILE, image_span=image_span)

    # -- ids -----------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    def token_to_id(self, token: str) -> int | None:
        """Id of a special token, or of a single ordinary token given as text."""
        if token in self.special_tokens:
            return self.special_tokens[token]
        ids = self.encoding.encode_ordinary(token)
        return ids[0] if len(ids) == 1 else None

    @property
    def eod_id(self) -> int:
        return self.special_tokens[ENDOFTEXT]

    @property
    def eos_token_id(self) -> int:
        """`<|endoftext|>`: where Qwen-VL's generation_config stops (the chat format also ends turns with `<|im_end|>`)."""
        return self.eod_id

    @property
    def im_start_id(self) -> int:
        return self.special_tokens[IM_START]

    @property
    def im_end_id(self) -> int:
        return self.special_tokens[IM_END]

    @property
    def img_start_id(self) -> int:
        return self.special_tokens[IMG_START]

    @property
    def img_end_id(self) -> int:
        return self.special_tokens[IMG_END]

    @property
    def img_pad_id(self) -> int:
        return self.special_tokens[IMG_PAD]

    # -- encode / decode ------------------------------------------------------------------------
    def encode_with_images(self, text: str, allowed_special: str | set[str] = "all") -> tuple[list[int], list[str]]:
        """Ids of `text` with each `<img>PATH</img>` expanded to `<img>` + image_span `<imgpad>` +
        `</img>`, and the PATHs (possibly empty) in order.

        `allowed_special` ("all" or a set of surface forms) are encoded as special tokens; any
        other special-token text is encoded as ordinary text (the original's `disallowed_special=()`).
        """
        if not isinstance(text, str):
            raise TypeError(f"expected a str, got {type(text).__name__}")
        ids = self.encoding.encode(unicodedata.normalize("NFC", text), allowed_special=allowed_special,
                                   disallowed_special=())
        return self._expand_image_spans(ids)

    def encode(self, text: str, allowed_special: str | set[str] = "all") -> list[int]:
        """Ids of `text`; image spans expanded (see `encode_with_images`)."""
        return self.encode_with_images(text, allowed_special)[0]

    def _expand_image_spans(self, ids: list[int]) -> tuple[list[int], list[str]]:
        out: list[int] = []
        paths: list[str] = []
        i = 0
        while i < len(ids):
            if ids[i] != self.img_start_id:
                out.append(ids[i])
                i += 1
                continue
            end = _index(ids, self.img_end_id, i)
            if end < 0:
                raise ValueError(f"unclosed image tag: {IMG_START} at token {i} has no {IMG_END} after it")
            paths.append(self.encoding.decode_bytes(ids[i + 1: end]).decode("utf-8", errors=self.errors))
            out += [self.img_start_id, *[self.img_pad_id] * self.image_span, self.img_end_id]
            i = end + 1
        return out, paths

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Text of `ids`. Image spans read `<img></img>` (the pads are dropped); with
        `skip_special_tokens` every special token is dropped (the original's `i < eod_id`).

        Ids >= `vocab_size` are skipped, as the tokenizers library skips ids it does not know:
        Qwen-VL's embedding has 151936 rows for 151851 tokens, so a generated id can have no token.
        Negative ids are not token ids at all: ValueError.
        """
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        negative = [i for i in ids if i < 0]
        if negative:
            raise ValueError(f"token ids {negative[:8]} are negative; allowed: ids >= 0")
        known = [i for i in ids if i < self.vocab_size]
        keep = [i for i in known if (i < self.eod_id if skip_special_tokens else i != self.img_pad_id)]
        return self.encoding.decode_bytes(keep).decode("utf-8", errors=self.errors)

    # -- chat ---------------------------------------------------------------------------------
    def encode_chat(self, query: str, system: str = DEFAULT_SYSTEM) -> tuple[list[int], list[str]]:
        """Ids of a single-turn ChatML prompt exactly as the original `make_context` builds them
        (role and content encoded separately, only the image tags special inside them), and the
        image PATHs of the query."""
        image_tags = set(IMAGE_SPECIAL_TOKENS)
        newline = self.encode("\n")

        def turn(role: str, content: str) -> tuple[list[int], list[str]]:
            body, paths = self.encode_with_images(content, image_tags)
            return [self.im_start_id, *self.encode(role, image_tags), *newline, *body, self.im_end_id], paths

        system_ids, system_paths = turn("system", system)
        user_ids, paths = turn("user", query)
        assistant = [self.im_start_id, *self.encode("assistant"), *newline]
        return [*system_ids, *newline, *user_ids, *newline, *assistant], system_paths + paths


def _index(ids: list[int], value: int, start: int) -> int:
    try:
        return ids.index(value, start)
    except ValueError:
        return -1


def qwen_vl_query(question: str, images: int | Sequence[str] = 1) -> str:
    """A user query with images first, as the original `from_list_format`:
    `"Picture 1: <img>PATH</img>\\n" ... + question`. `images` is a count (empty spans, the
    pixels are passed separately) or the PATHs."""
    paths = [""] * images if isinstance(images, int) else [str(p) for p in images]
    pictures = "".join(f"Picture {i}: {IMG_START}{path}{IMG_END}\n" for i, path in enumerate(paths, start=1))
    return pictures + question


def qwen_chat_prompt(query: str, system: str = DEFAULT_SYSTEM) -> str:
    """The single-turn ChatML text (the original's `raw_text`) for a user `query`."""
    return f"{IM_START}system\n{system}{IM_END}\n{IM_START}user\n{query}{IM_END}\n{IM_START}assistant\n"


@dataclass
class QwenVLImageProcessor:
    """visual.py's `image_transform`: PIL bicubic resize to (image_size, image_size), /255, CLIP mean/std."""

    image_size: int = 448
    image_mean: tuple[float, float, float] = field(default=OPENAI_CLIP_MEAN)
    image_std: tuple[float, float, float] = field(default=OPENAI_CLIP_STD)

    def __post_init__(self) -> None:
        if not isinstance(self.image_size, int) or self.image_size < 1:
            raise ValueError(f"image_size={self.image_size!r} is invalid; allowed: an integer >= 1")

    def __call__(self, images: ImageLike | Sequence[ImageLike], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Images (PIL or paths) -> [N, 3, S, S] in `dtype` (the arithmetic runs in it, as ToTensor and
        Normalize do in torch's default dtype)."""
        if isinstance(images, (Image.Image, str, os.PathLike)):
            images = [images]
        if len(images) == 0:
            raise ValueError("no images given")
        return torch.stack([self.preprocess_one(image, dtype) for image in images])

    def preprocess_one(self, image: ImageLike, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        # the original: Image.open(path).convert("RGB"), no EXIF rotation
        image = load_image(image, exif_transpose=False) if not isinstance(image, Image.Image) else \
            to_8bit(image).convert("RGB")
        size = self.image_size
        resized = image.resize((size, size), resample=Image.Resampling.BICUBIC)
        pixels = torch.frombuffer(bytearray(resized.tobytes()), dtype=torch.uint8).view(size, size, 3)
        x = pixels.permute(2, 0, 1).to(dtype) / 255  # [3, S, S]
        mean = torch.tensor(self.image_mean, dtype=dtype).view(3, 1, 1)
        std = torch.tensor(self.image_std, dtype=dtype).view(3, 1, 1)
        return (x - mean) / std


class QwenVLProcessor:
    """Tokenizer + image transform for Qwen-VL: prompts and images -> `input_ids`, `attention_mask`,
    `pixel_values` (batches left-padded with `<|endoftext|>`, the checkpoints' pad id)."""

    def __init__(self, tokenizer: QwenTokenizer, image_processor: QwenVLImageProcessor | None = None) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor or QwenVLImageProcessor()

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> QwenVLProcessor:
        """`qwen.tiktoken` plus `config.json`'s `visual` (image_size, n_queries; image_start_id is
        checked against the tokenizer's `<img>` id)."""
        root = Path(path)
        config_file = root / "config.json"
        visual = json.loads(config_file.read_text()).get("visual", {}) if config_file.is_file() else {}
        tokenizer = QwenTokenizer.from_dir(root, image_span=int(visual.get("n_queries", IMAGE_SPAN)))
        start = visual.get("image_start_id")
        if start is not None and int(start) != tokenizer.img_start_id:
            raise ValueError(f"config.json visual.image_start_id={start} but {TIKTOKEN_FILE} puts {IMG_START} at id "
                             f"{tokenizer.img_start_id} in {str(root)!r}")
        return cls(tokenizer, QwenVLImageProcessor(int(visual.get("image_size", 448))))

    def __call__(self, prompts: str | Sequence[str], images: Any = None,
                 dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Raw prompts (e.g. `qwen_chat_prompt(qwen_vl_query(q))`); each `<img>PATH</img>` is one image.

        `images`: None to open each span's PATH; else one image (PIL or path) per span, flat in
        order across the batch or one list per prompt, with the spans left empty (`<img></img>`).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        encoded = [self.tokenizer.encode_with_images(p) for p in prompts]
        return self._batch(encoded, images, dtype)

    @property
    def pad_token_id(self) -> int:
        """Left padding uses `<|endoftext|>`, the checkpoints' pad id."""
        return self.tokenizer.eod_id

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Token ids -> text (the tokenizer's `decode`; special tokens dropped by default)."""
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def chat(self, queries: str | Sequence[str], images: Any = None, system: str = DEFAULT_SYSTEM,
             dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Single-turn chat prompts built like the original `model.chat` (`make_context`), e.g.
        `processor.chat(qwen_vl_query("What is this?"), images=[image])`."""
        queries = [queries] if isinstance(queries, str) else list(queries)
        return self._batch([self.tokenizer.encode_chat(q, system) for q in queries], images, dtype)

    def _batch(self, encoded: list[tuple[list[int], list[str]]], images: Any,
               dtype: torch.dtype) -> dict[str, torch.Tensor]:
        if not encoded:
            raise ValueError("no prompts given")
        sources = self._match_images([paths for _, paths in encoded], images)
        out = _left_pad([ids for ids, _ in encoded], self.tokenizer.eod_id)
        if sources:
            out["pixel_values"] = self.image_processor(sources, dtype)
        return out

    @staticmethod
    def _match_images(paths: list[list[str]], images: Any) -> list[ImageLike]:
        """The image of every span, in order: the given images, or the spans' PATHs."""
        counts = [len(p) for p in paths]
        if images is None:
            empty = [(b, i) for b, row in enumerate(paths) for i, p in enumerate(row) if not p]
            if empty:
                prompt, span = empty[0]
                raise ValueError(f"image span {span} of prompt {prompt} is empty (<img></img>) and no images were "
                                 f"given; pass images, or a path inside the span")
            return [p for row in paths for p in row]
        if isinstance(images, (Image.Image, str, os.PathLike)):
            images = [images]
        images = list(images)
        if images and all(isinstance(x, (list, tuple)) for x in images):
            if [len(x) for x in images] != counts:
                raise ValueError(f"the prompts have {counts} image span(s) each but the image lists hold "
                                 f"{[len(x) for x in images]}")
            images = [im for group in images for im in group]
        if len(images) != sum(counts):
            raise ValueError(f"the prompts have {sum(counts)} image span(s) (per prompt: {counts}) but "
                             f"{len(images)} image(s) were given")
        named = [p for row in paths for p in row if p]
        if named:
            raise ValueError(f"images were given and the spans also name {named[:3]}; leave the spans empty "
                             f"(<img></img>) or pass no images")
        return images


def _left_pad(rows: list[list[int]], pad: int) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.int64)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for b, row in enumerate(rows):
        if row:
            input_ids[b, width - len(row):] = torch.tensor(row, dtype=torch.int64)
            attention_mask[b, width - len(row):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}
