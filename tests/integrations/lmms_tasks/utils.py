"""Task functions of the local lmms-eval tasks: lmms-eval's own DocVQA prompt and visual, over the tiny
parquet shards that `avl.testing.eval_data.write_tiny_parquet` writes (images as {bytes, path} structs)."""

import datasets
from PIL import Image
from lmms_eval.tasks.docvqa.utils import docvqa_doc_to_text, docvqa_doc_to_visual

__all__ = ["decode_images", "docvqa_doc_to_text", "docvqa_doc_to_visual", "mc_doc_to_text", "two_images"]


def decode_images(dataset):
    """The parquet's {bytes, path} structs as datasets.Image, as the hub dataset declares them."""
    return dataset.cast_column("image", datasets.Image())


def two_images(doc):
    """The image and its mirror image: a two-image request."""
    image = doc["image"].convert("RGB")
    return [image, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]


def mc_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return f"{doc['question']}\nAnswer with yes or no."
