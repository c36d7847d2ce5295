"""Reading evaluation data in the hub layouts and the jsonl format; the results files. No model here."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from avl.eval import DataError, RunMismatchError, SampleError, get_task, open_dataset
from avl.eval.results import ResultsStore
from avl.testing.eval_data import HUB_LAYOUTS, tiny_rows, write_tiny_jsonl, write_tiny_parquet

# The hub's column names (dataset_info of each dataset card), written out independently of avl.testing.eval_data.
HUB_COLUMNS = {
    "docvqa_val": ["questionId", "question", "question_types", "image", "docId", "ucsf_document_id",
                   "ucsf_document_page_no", "answers", "data_split"],
    "textvqa_val": ["image_id", "question_id", "question", "question_tokens", "image", "image_width", "image_height",
                    "flickr_original_url", "flickr_300k_url", "answers", "image_classes", "set_name", "ocr_tokens"],
    "ocrbench": ["dataset", "question", "question_type", "answer", "image"],
    "nocaps_val": ["image", "image_coco_url", "image_date_captured", "image_file_name", "image_height", "image_width",
                   "image_id", "image_license", "image_open_images_id", "annotations_ids", "annotations_captions"],
    "flickr30k_test": ["image", "caption", "sentids", "img_id", "filename"],
    "vqav2_val": ["question_type", "multiple_choice_answer", "answers", "image_id", "answer_type", "question_id",
                  "question", "image"],
}
ID_OF_ROW = {"docvqa_val": "50001", "textvqa_val": "34603", "ocrbench": "1", "nocaps_val": "1", "flickr30k_test": "1",
             "vqav2_val": "42001"}


@pytest.mark.parametrize("task", list(HUB_COLUMNS))
def test_hub_layout_is_read_in_order(task, tmp_path):
    root = write_tiny_parquet(task, tmp_path, n=5, shards=2)
    folder, split = HUB_LAYOUTS[task]
    shards = sorted((root / folder).glob("*.parquet"))
    assert [s.name for s in shards] == [f"{split}-00000-of-00002.parquet", f"{split}-00001-of-00002.parquet"]
    schema = pq.read_schema(shards[0])
    assert schema.names == HUB_COLUMNS[task]
    assert schema.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    dataset = open_dataset(root, get_task(task))
    assert len(dataset) == 5
    samples = list(dataset.samples([3, 1]))
    assert [s.index for s in samples] == [1, 3]
    assert samples[0].id == ID_OF_ROW[task]
    assert "image" not in samples[0].doc and samples[0].load_image().mode == "RGB"
    expected = tiny_rows(task, 5)[1]
    assert {k: v for k, v in samples[0].doc.items()} == {k: v for k, v in expected.items() if k != "image"}


def test_split_and_config_folders_are_chosen(tmp_path):
    task = get_task("docvqa_val")
    write_tiny_parquet("docvqa_val", tmp_path, n=3)
    # another split of the same config, and another config (lmms-lab/DocVQA also holds InfographicVQA)
    rows = tiny_rows("docvqa_val", 2, seed=1)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "DocVQA" / "test-00000-of-00001.parquet")
    (tmp_path / "InfographicVQA").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "InfographicVQA" / "validation-00000-of-00001.parquet")
    assert len(open_dataset(tmp_path, task)) == 3
    assert len(open_dataset(tmp_path / "DocVQA" / "test-00000-of-00001.parquet", task)) == 2  # one file: all rows
    only_train = tmp_path / "only_train" / "data"
    only_train.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), only_train / "train-00000-of-00001.parquet")
    with pytest.raises(DataError, match=r"split\(s\) \['train'\] but none of 'validation', which docvqa_val"):
        open_dataset(only_train.parent, task)


def test_missing_column_names_the_column_and_the_file(tmp_path):
    rows = tiny_rows("vqav2_val", 2)
    for row in rows:
        del row["answers"]
    (tmp_path / "data").mkdir()
    path = tmp_path / "data" / "validation-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataError, match=f"{path}: missing column 'answers' needed by task vqav2_val"):
        open_dataset(tmp_path, get_task("vqav2_val"))


def test_empty_or_missing_data_path(tmp_path):
    task = get_task("textvqa_val")
    with pytest.raises(DataError, match="no parquet shards under"):
        open_dataset(tmp_path, task)
    with pytest.raises(DataError, match="no such file or directory"):
        open_dataset(tmp_path / "nope", task)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="holds no samples"):
        open_dataset(tmp_path / "empty.jsonl", task)


def test_jsonl_format(tmp_path):
    path = write_tiny_jsonl("ocrbench", tmp_path, n=3)
    dataset = open_dataset(path, get_task("ocrbench"))
    samples = list(dataset.samples())
    assert [s.id for s in samples] == ["custom-0", "custom-1", "custom-2"]
    assert samples[2].load_image().size[0] >= 16
    lines = path.read_text().splitlines()
    row = json.loads(lines[1])
    del row["question_type"]
    lines[1] = json.dumps(row)
    path.write_text("\n".join(lines))
    with pytest.raises(DataError, match="line 2: missing field 'question_type' needed by task ocrbench"):
        open_dataset(path, get_task("ocrbench"))


def test_unreadable_image_names_the_sample(tmp_path):
    rows = tiny_rows("docvqa_val", 3)
    rows[1]["image"] = {"bytes": b"not an image", "path": "x.png"}
    write_tiny_parquet("docvqa_val", tmp_path, rows=rows)
    sample = list(open_dataset(tmp_path, get_task("docvqa_val")).samples([1]))[0]
    with pytest.raises(SampleError, match=r"sample 50001 \(index 1\): unreadable image \(UnidentifiedImageError"):
        sample.load_image()


def test_image_path_without_bytes_is_resolved_next_to_the_shard(tmp_path):
    rows = tiny_rows("flickr30k_test", 2)
    (tmp_path / "data").mkdir()
    buffer = io.BytesIO()
    Image.new("RGB", (9, 7), (1, 2, 3)).save(buffer, format="PNG")
    (tmp_path / "data" / "pic.png").write_bytes(buffer.getvalue())
    rows[0]["image"] = {"bytes": None, "path": "pic.png"}
    write_tiny_parquet("flickr30k_test", tmp_path, rows=rows, shards=1)
    sample = next(open_dataset(tmp_path, get_task("flickr30k_test")).samples([0]))
    assert sample.load_image().size == (9, 7)


def test_results_store_refuses_another_config_and_drops_a_cut_line(tmp_path):
    store = ResultsStore(tmp_path, {"task": "ocrbench", "policy": {"repr": "Full()"}})
    with store.writer(0, 1) as writer:
        writer.append({"index": 0, "error": None, "prediction": "a"})
        writer.append({"index": 1, "error": "sample 1: bad", "prediction": None})
    path = tmp_path / "samples.jsonl"
    path.write_text(path.read_text() + '{"index": 2, "err')  # an interrupted write
    assert sorted(store.load()) == [0, 1]
    with store.writer(0, 1) as writer:
        writer.append({"index": 1, "error": None, "prediction": "b"})  # a retried failure replaces the old record
    assert store.load()[1]["prediction"] == "b"
    assert all(json.loads(line) for line in path.read_text().splitlines())
    other = ResultsStore(tmp_path, {"task": "ocrbench", "policy": {"repr": "AVL(secondary=0.5)"}})
    with pytest.raises(RunMismatchError, match=r"different run .* differing: policy: \{'repr': 'Full\(\)'\} there, "
                                               r"\{'repr': 'AVL\(secondary=0.5\)'\} now"):
        other.load()
