"""Evaluation data read from local files: the hub's parquet shards, or a jsonl file with images.

``--data PATH`` is

* a directory of parquet shards in the layout of the hub datasets lmms-eval uses, as
  ``huggingface-cli download --repo-type dataset`` leaves them: ``data/validation-00000-of-00004.parquet``,
  a config folder (``DocVQA/validation-*.parquet``), or the parquet-converter's
  ``<config>/<split>/0000.parquet``. Shards of the task's split are taken (the file-name prefix
  before the first ``-``, or the folder name), in name order; a folder named like the task's hub
  config wins over other configs. Images are the ``datasets.Image`` struct ``{bytes, path}``;
* a single ``.parquet`` file (all its rows);
* a ``.jsonl`` file, one object per line with the task's columns (the hub's names, e.g.
  ``question`` and ``answers``) and ``image``: a file path relative to the jsonl's folder, or
  absolute. An ``id`` field, or the task's id column, names the sample.

Samples are numbered by their position in that order (``index``), which is what results files
and sharding refer to. Images are decoded only when a sample is processed.

``Dataset.sha256`` is a hash of the data's content (the jsonl file's bytes; every shard's name and
bytes, in order), which results files are keyed on, so editing the data in place is noticed. Image
files that a jsonl names by path are not part of it.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from avl.eval.tasks import Task
from avl.processing.image import to_8bit

__all__ = ["DataError", "Dataset", "ImageRef", "Sample", "SampleError", "find_shards", "open_dataset"]

KNOWN_SPLITS = frozenset({"train", "validation", "val", "test", "testdev", "dev", "lite"})


class DataError(ValueError):
    """The data path or a file in it cannot serve the task."""


class SampleError(ValueError):
    """One sample cannot be processed (its image, a field); names the sample."""


@dataclass(frozen=True)
class ImageRef:
    """An undecoded image: encoded bytes, or a file path (relative paths resolve against ``base``)."""

    data: bytes | None
    path: str | None
    base: Path | None = None

    def open(self) -> Image.Image:
        """Decode to an RGB image, 16- and 32-bit integer images scaled to 8 bit (`to_8bit`); raises
        ``OSError`` / ``ValueError`` from PIL on bad data."""
        if self.data is not None:
            with Image.open(io.BytesIO(self.data)) as image:
                return to_8bit(image).convert("RGB")
        if self.path:
            path = Path(self.path)
            if not path.is_absolute() and self.base is not None:
                path = self.base / path
            with Image.open(path) as image:
                return to_8bit(image).convert("RGB")
        raise ValueError("the image has neither bytes nor a path")


@dataclass(frozen=True)
class Sample:
    """One row: ``index`` (position in the dataset), ``id`` (the dataset's id, or the index),
    ``doc`` (the row's fields without the image) and the undecoded image."""

    index: int
    id: str
    doc: dict[str, Any]
    image: ImageRef

    def load_image(self) -> Image.Image:
        try:
            return self.image.open()
        except Exception as error:  # PIL raises several types for corrupt data
            raise SampleError(f"sample {self.id} (index {self.index}): unreadable image ({type(error).__name__}: "
                              f"{error})") from error


class Dataset:
    """Random-free, ordered access to a task's samples. Subclasses: parquet shards and jsonl."""

    source: str

    def __len__(self) -> int:
        raise NotImplementedError

    @property
    def sha256(self) -> str:
        """Hex sha256 of the data's content (see the module docstring)."""
        raise NotImplementedError

    def samples(self, indices: Iterable[int] | None = None) -> Iterator[Sample]:
        """The samples at `indices` (all when None), in index order."""
        raise NotImplementedError


def _image_ref(value: Any, base: Path | None, where: str) -> ImageRef:
    if isinstance(value, dict):
        return ImageRef(value.get("bytes"), value.get("path"), base)
    if isinstance(value, (bytes, bytearray)):
        return ImageRef(bytes(value), None, base)
    if isinstance(value, str):
        return ImageRef(None, value, base)
    if value is None:
        return ImageRef(None, None, base)
    raise DataError(f"{where}: the image field must be a {{bytes, path}} struct, bytes or a path, got "
                    f"{type(value).__name__}")


def _sample(task: Task, index: int, row: dict[str, Any], base: Path | None, where: str) -> Sample:
    image = _image_ref(row.pop(task.image_column, None), base, where)
    sample_id = row.get("id")
    if sample_id is None and task.id_column:
        sample_id = row.get(task.id_column)
    return Sample(index, str(index if sample_id is None else sample_id), row, image)


def _pyarrow() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("reading parquet shards needs pyarrow: pip install 'avl[eval]' (or pip install pyarrow)") \
            from error
    return pq


def _split_of(path: Path) -> str:
    return path.stem.split("-")[0] if "-" in path.stem else path.parent.name


def find_shards(root: Path, task: Task) -> list[Path]:
    """The parquet shards of `task`'s split under `root` (see the module docstring)."""
    files = sorted(p for p in root.rglob("*.parquet")
                   if not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise DataError(f"no parquet shards under {root} (expected the hub layout of {task.dataset}, e.g. "
                        f"data/{task.split}-00000-of-00001.parquet); --data may also name a .jsonl file")
    if task.config:
        in_config = [p for p in files if task.config in p.relative_to(root).parts[:-1]]
        files = in_config or files
    chosen = [p for p in files if _split_of(p) == task.split]
    if chosen:
        return chosen
    splits = sorted({_split_of(p) for p in files})
    if any(s in KNOWN_SPLITS for s in splits):
        raise DataError(f"{root} has shards of split(s) {splits} but none of {task.split!r}, which {task.name} "
                        f"evaluates")
    return files  # a custom layout without split names: every shard


class ParquetDataset(Dataset):
    """Rows of parquet shards, read one row group at a time."""

    def __init__(self, files: list[Path], task: Task, source: str) -> None:
        pq = _pyarrow()
        self.task, self.files, self.source = task, files, source
        self.row_groups: list[tuple[Path, int, int]] = []  # (file, row group, first index)
        start = 0
        for path in files:
            try:
                meta = pq.ParquetFile(path).metadata
                names = set(pq.read_schema(path).names)
            except Exception as error:
                raise DataError(f"{path}: not a readable parquet file ({error})") from error
            missing = [c for c in (task.image_column, *task.columns) if c not in names]
            if missing:
                raise DataError(f"{path}: missing column {missing[0]!r} needed by task {task.name} "
                                f"(needs {[task.image_column, *task.columns]}; the file has {sorted(names)})")
            for group in range(meta.num_row_groups):
                self.row_groups.append((path, group, start))
                start += meta.row_group(group).num_rows
        self.length = start

    def __len__(self) -> int:
        return self.length

    @property
    def sha256(self) -> str:
        """Every shard's name (relative to ``--data``) and bytes, in order; read in 1 MiB chunks once
        per run (seconds for gigabytes)."""
        digest = hashlib.sha256()
        root = Path(self.source)
        base = root if root.is_dir() else root.parent
        for path in self.files:
            digest.update(f"{path.relative_to(base).as_posix()}\0{path.stat().st_size}\0".encode())
            with path.open("rb") as f:
                for chunk in iter(lambda: f.read(2**20), b""):
                    digest.update(chunk)
        return digest.hexdigest()

    def samples(self, indices: Iterable[int] | None = None) -> Iterator[Sample]:
        pq = _pyarrow()
        wanted = None if indices is None else sorted(set(indices))
        position = 0
        ends = [g[2] for g in self.row_groups[1:]] + [self.length]
        handles: dict[Path, Any] = {}
        for (path, group, first), end in zip(self.row_groups, ends, strict=True):
            if wanted is None:
                local = list(range(end - first))
            else:
                local = []
                while position < len(wanted) and wanted[position] < end:
                    if wanted[position] >= first:
                        local.append(wanted[position] - first)
                    position += 1
            if not local:
                continue
            handle = handles.setdefault(path, pq.ParquetFile(path))
            rows = handle.read_row_group(group).take(local).to_pylist()
            for offset, row in zip(local, rows, strict=True):
                yield _sample(self.task, first + offset, row, path.parent, f"{path} row {offset}")


class JsonlDataset(Dataset):
    """Rows of a jsonl file; images are files relative to its folder."""

    def __init__(self, path: Path, task: Task) -> None:
        self.task, self.path, self.source = task, path, str(path)
        self.rows: list[dict[str, Any]] = []
        content = path.read_bytes()
        self._sha256 = hashlib.sha256(content).hexdigest()
        for number, line in enumerate(content.decode("utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path} line {number}: not JSON ({error})") from error
            if not isinstance(row, dict):
                raise DataError(f"{path} line {number}: expected a JSON object, got {type(row).__name__}")
            missing = [c for c in (task.image_column, *task.columns) if c not in row]
            if missing:
                raise DataError(f"{path} line {number}: missing field {missing[0]!r} needed by task {task.name} "
                                f"(needs {[task.image_column, *task.columns]})")
            self.rows.append(row)
        if not self.rows:
            raise DataError(f"{path} holds no samples")

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def sha256(self) -> str:
        """The jsonl file's bytes as read."""
        return self._sha256

    def samples(self, indices: Iterable[int] | None = None) -> Iterator[Sample]:
        chosen = range(len(self.rows)) if indices is None else sorted(set(indices))
        for index in chosen:
            yield _sample(self.task, index, dict(self.rows[index]), self.path.parent, f"{self.path} row {index}")


def open_dataset(path: str | Path, task: Task) -> Dataset:
    """The dataset at `path` for `task` (a directory of shards, a .parquet or a .jsonl file).

    Raises :class:`DataError` for a missing or empty path, a missing column (naming it and the
    file), or shards of another split only.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"--data {str(path)!r}: no such file or directory")
    if root.is_dir():
        dataset: Dataset = ParquetDataset(find_shards(root, task), task, str(root))
    elif root.suffix == ".jsonl":
        dataset = JsonlDataset(root, task)
    elif root.suffix == ".parquet":
        dataset = ParquetDataset([root], task, str(root))
    else:
        raise DataError(f"--data {str(path)!r}: expected a directory of parquet shards, a .parquet or a .jsonl file")
    if len(dataset) == 0:
        raise DataError(f"--data {str(path)!r}: the {task.name} data there has no rows")
    return dataset
