"""Tiny datasets in the hub layouts of the six tasks, written locally (no download).

For smoke runs and tests of ``avl eval``, like :mod:`avl.testing.llava_checkpoint` for checkpoints: parquet shards with
the hub datasets' own column names and types (from their ``dataset_info``: lmms-lab/DocVQA config
``DocVQA``, lmms-lab/textvqa, echo840/OCRBench, lmms-lab/NoCaps, lmms-lab/flickr30k, lmms-lab/VQAv2),
images as ``{bytes, path}`` structs, split over two shards; or the jsonl + image-folder format.
The questions and answers are made up.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

__all__ = ["HUB_LAYOUTS", "tiny_image_bytes", "tiny_rows", "write_tiny_jsonl", "write_tiny_parquet"]

# task -> (shard folder inside the dataset repo, split)
HUB_LAYOUTS: dict[str, tuple[str, str]] = {
    "docvqa_val": ("DocVQA", "validation"),
    "textvqa_val": ("data", "validation"),
    "ocrbench": ("data", "test"),
    "nocaps_val": ("data", "validation"),
    "flickr30k_test": ("data", "test"),
    "vqav2_val": ("data", "validation"),
}

WORDS = ("red", "bus", "street", "two", "dog", "yes", "no", "sign", "open", "tree", "man", "table", "blue", "car")


def tiny_image_bytes(rng: random.Random, fmt: str = "PNG") -> bytes:
    """A small random-colour image of random size, encoded."""
    size = (rng.randint(16, 48), rng.randint(16, 48))
    image = Image.new("RGB", size, tuple(rng.randint(0, 255) for _ in range(3)))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _phrase(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _docvqa(i: int, rng: random.Random) -> dict[str, Any]:
    return {"questionId": str(50000 + i), "question": f"What is written in box {i}?", "question_types": ["form"],
            "docId": 1000 + i, "ucsf_document_id": f"xnbl{i:04d}", "ucsf_document_page_no": "1",
            "answers": [_phrase(rng, 2), _phrase(rng, 1)], "data_split": "val"}


def _textvqa(i: int, rng: random.Random) -> dict[str, Any]:
    return {"image_id": f"{i:016x}", "question_id": 34602 + i, "question": f"what does sign {i} say?",
            "question_tokens": ["what", "does", "sign", str(i), "say"], "image_width": 32, "image_height": 24,
            "flickr_original_url": "", "flickr_300k_url": "", "answers": [_phrase(rng, 1) for _ in range(10)],
            "image_classes": ["Sign"], "set_name": "val", "ocr_tokens": [_phrase(rng, 1) for _ in range(3)]}


def _ocrbench(i: int, rng: random.Random) -> dict[str, Any]:
    kinds = [("IIIT5K", "Regular Text Recognition"), ("HME100k", "Handwritten Mathematical Expression Recognition"),
             ("docVQA", "Doc-oriented VQA")]
    dataset, question_type = kinds[i % len(kinds)]
    return {"dataset": dataset, "question": " what is written in the image? ", "question_type": question_type,
            "answer": [_phrase(rng, 1)]}


def _nocaps(i: int, rng: random.Random) -> dict[str, Any]:
    return {"image_coco_url": f"https://s3.amazonaws.com/nocaps/val/{i:016x}.jpg",
            "image_date_captured": "2018-11-06 11:04:33", "image_file_name": f"{i:016x}.jpg", "image_height": 24,
            "image_width": 32, "image_id": i, "image_license": 0, "image_open_images_id": f"{i:016x}",
            "annotations_ids": list(range(10 * i, 10 * i + 10)),
            "annotations_captions": [f"a {_phrase(rng, 3)} on the {_phrase(rng, 1)}." for _ in range(10)]}


def _flickr(i: int, rng: random.Random) -> dict[str, Any]:
    return {"caption": [f"A {_phrase(rng, 3)} near a {_phrase(rng, 1)}." for _ in range(5)],
            "sentids": [str(5 * i + k) for k in range(5)], "img_id": str(i), "filename": f"{1000 + i}.jpg"}


def _vqav2(i: int, rng: random.Random) -> dict[str, Any]:
    answers = [{"answer": _phrase(rng, 1), "answer_confidence": "yes", "answer_id": k + 1} for k in range(10)]
    return {"question_type": "what color", "multiple_choice_answer": answers[0]["answer"], "answers": answers,
            "image_id": 42 + i, "answer_type": "other", "question_id": 42000 + i, "question": f"What color is {i}?"}


ROWS: dict[str, Callable[[int, random.Random], dict[str, Any]]] = {
    "docvqa_val": _docvqa, "textvqa_val": _textvqa, "ocrbench": _ocrbench, "nocaps_val": _nocaps,
    "flickr30k_test": _flickr, "vqav2_val": _vqav2,
}


def tiny_rows(task: str, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` rows of `task` with the hub's columns; ``image`` is ``{bytes, path}``."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        row = ROWS[task](i, rng)
        row["image"] = {"bytes": tiny_image_bytes(rng, "PNG" if i % 2 else "JPEG"), "path": f"{i}.png"}
        rows.append(row)
    return rows


def _schema(task: str) -> Any:
    import pyarrow as pa

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    strings = pa.list_(pa.string())
    s, i32, i64 = pa.string(), pa.int32(), pa.int64()
    fields = {
        "docvqa_val": [("questionId", s), ("question", s), ("question_types", strings), ("image", image),
                       ("docId", i64), ("ucsf_document_id", s), ("ucsf_document_page_no", s), ("answers", strings),
                       ("data_split", s)],
        "textvqa_val": [("image_id", s), ("question_id", i32), ("question", s), ("question_tokens", strings),
                        ("image", image), ("image_width", i32), ("image_height", i32), ("flickr_original_url", s),
                        ("flickr_300k_url", s), ("answers", strings), ("image_classes", strings), ("set_name", s),
                        ("ocr_tokens", strings)],
        "ocrbench": [("dataset", s), ("question", s), ("question_type", s), ("answer", strings), ("image", image)],
        "nocaps_val": [("image", image), ("image_coco_url", s), ("image_date_captured", s), ("image_file_name", s),
                       ("image_height", i32), ("image_width", i32), ("image_id", i32), ("image_license", pa.int8()),
                       ("image_open_images_id", s), ("annotations_ids", pa.list_(i32)),
                       ("annotations_captions", strings)],
        "flickr30k_test": [("image", image), ("caption", strings), ("sentids", strings), ("img_id", s),
                           ("filename", s)],
        "vqav2_val": [("question_type", s), ("multiple_choice_answer", s),
                      ("answers", pa.list_(pa.struct([("answer", s), ("answer_confidence", s), ("answer_id", i64)]))),
                      ("image_id", i64), ("answer_type", s), ("question_id", i64), ("question", s), ("image", image)],
    }[task]
    return pa.schema(fields)


def write_tiny_parquet(task: str, root: str | Path, n: int = 4, seed: int = 0, shards: int = 2,
                       rows: list[dict[str, Any]] | None = None) -> Path:
    """Write `task`'s tiny dataset in its hub layout under `root` and return `root`
    (e.g. ``root/DocVQA/validation-00000-of-00002.parquet``). `rows` replaces the generated rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder, split = HUB_LAYOUTS[task]
    rows = rows if rows is not None else tiny_rows(task, n, seed)
    out = Path(root) / folder
    out.mkdir(parents=True, exist_ok=True)
    schema = _schema(task)
    shards = max(1, min(shards, len(rows)))
    bounds = [round(k * len(rows) / shards) for k in range(shards + 1)]
    for k in range(shards):
        part = rows[bounds[k]:bounds[k + 1]]
        table = pa.Table.from_pylist(part, schema=schema)
        pq.write_table(table, out / f"{split}-{k:05d}-of-{shards:05d}.parquet", row_group_size=2)
    return Path(root)


def write_tiny_jsonl(task: str, root: str | Path, n: int = 4, seed: int = 0) -> Path:
    """Write `task`'s tiny dataset as ``root/data.jsonl`` + ``root/images/*`` and return the jsonl path."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, row in enumerate(tiny_rows(task, n, seed)):
        image = root / "images" / f"{i}.img"
        image.write_bytes(row.pop("image")["bytes"])
        lines.append(json.dumps({"id": f"custom-{i}", **row, "image": f"images/{image.name}"}))
    path = root / "data.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
