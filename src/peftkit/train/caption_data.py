"""The examples of task ``image_caption``: grey images with a class word each, from a built-in image source
or from a table whose rows name an image file.

- Built-in sources (:mod:`peftkit.train.images`): ``builtin:digits/train`` ... answer with the digit's word
  ("seven"), ``builtin:fashion_mnist/...`` with the class name in lower case ("ankle boot").
- A .jsonl / .tsv / .csv table (:mod:`peftkit.train.data`): each row has an ``image`` field, the path of an
  image file relative to the table's folder (``.npy``: a 2-D uint8 array; ``.png`` / ``.jpg`` / ``.bmp``:
  read with Pillow and turned grey), and the answer word in ``data.label_column``. Every image of a table
  has one size. A row without its image field, with a missing or unreadable image file, or of another
  size fails as ``file:line`` (or is skipped and reported, as ``data.bad_rows`` says).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .data import DataError, bad_row, check_columns, read_table, report_skipped
from .images import DIGIT_LABELS, FASHION_MNIST_LABELS, load_images

IMAGE_COLUMN = "image"
IMAGE_SUFFIXES = (".npy", ".png", ".jpg", ".jpeg", ".bmp")
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def builtin_words(names: list[str]) -> list[str]:
    """The answer word of each class of a built-in source."""
    if names == DIGIT_LABELS:
        return list(DIGIT_WORDS)
    if names == FASHION_MNIST_LABELS:
        return [n.lower() for n in names]
    return list(names)


def read_examples(source: str, limit: int | None, label_column: str,
                  bad_rows: str) -> tuple[Tensor, list[str], list[str] | None, str | None]:
    """(uint8 images (N, H, W), each image's answer word, the source's class words in class order (None for a
    table: its classes are the answers it holds), a skipped-rows note or None)."""
    if source.startswith("builtin:"):
        x, y, names = load_images(source, limit)
        words = builtin_words(names)
        return x, [words[i] for i in y], words, None
    table = check_columns(read_table(source, limit), [IMAGE_COLUMN, label_column], ["image", "answer"], bad_rows)
    root = os.path.dirname(os.path.abspath(source))
    images: list[np.ndarray] = []
    words: list[str] = []
    skipped = list(table.skipped)
    for row, line in zip(table.rows, table.lines):
        try:
            img = read_image(os.path.join(root, str(row[IMAGE_COLUMN])))
            if images and img.shape != images[0].shape:
                raise DataError(f"image {row[IMAGE_COLUMN]!r} is {img.shape[0]}x{img.shape[1]}, the table's "
                                f"first is {images[0].shape[0]}x{images[0].shape[1]}")
        except DataError as exc:
            bad_row(table, line, f"{IMAGE_COLUMN}: {exc}", bad_rows, skipped)
            continue
        images.append(img)
        words.append(str(row[label_column]).strip())
    table.skipped = skipped
    if not images:
        raise DataError(f"{table.source}: no usable rows")
    return torch.from_numpy(np.stack(images)), words, None, report_skipped(table)


def read_image(path: str) -> np.ndarray:
    """A grey uint8 image (H, W) from a ``.npy`` array or an image file; a DataError says what is wrong."""
    if not path.lower().endswith(IMAGE_SUFFIXES):
        raise DataError(f"{path}: expected one of {', '.join(IMAGE_SUFFIXES)}")
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    if path.lower().endswith(".npy"):
        try:
            arr: Any = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: not a numpy array file ({exc})") from None
        if arr.ndim != 2 or arr.dtype != np.uint8:
            raise DataError(f"{path}: expected a 2-D uint8 array, got {arr.dtype} of shape {arr.shape}")
        return arr
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise DataError(f"{path}: reading image files needs Pillow (pip install pillow), or use .npy") from None
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L"), dtype=np.uint8).copy()
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"{path}: not a readable image ({exc})") from None
