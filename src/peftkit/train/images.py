"""Built-in image sources of the image tasks: Fashion-MNIST (IDX files of the Debian package
``dataset-fashion-mnist``) and scikit-learn's digits, as uint8 arrays, and their conversion to model input.
The sources are described in :mod:`peftkit.train.vision`."""

from __future__ import annotations

import functools
import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .data import DataError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                        "Bag", "Ankle boot"]
DIGIT_LABELS = [str(i) for i in range(10)]
DIGITS_TEST = 360  # of 1,797: the first 360 of a fixed permutation are the test split
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# ---------------------------------------------------------------------------------------------- data
def read_idx(path: str | os.PathLike, limit: int | None = None) -> np.ndarray:
    """An IDX file (``.gz`` or plain) as a native-endian array; ``limit`` reads only the first rows."""
    path = os.fspath(path)
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        head = f.read(4)
        if len(head) < 4 or head[:2] != b"\0\0" or head[2] not in _IDX_TYPES:
            raise DataError(f"{path}: not an IDX file (bad magic number {head.hex()})")
        shape = list(struct.unpack(f">{head[3]}I", f.read(4 * head[3])))
        dtype = np.dtype(_IDX_TYPES[head[2]])
        if limit is not None and shape:
            shape[0] = min(shape[0], limit)
        count = int(np.prod(shape))
        data = f.read(count * dtype.itemsize)
    if len(data) != count * dtype.itemsize:
        raise DataError(f"{path}: truncated (expected {count} values of shape {tuple(shape)})")
    return np.frombuffer(data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def fashion_mnist(split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``train`` or ``test``: uint8 images (N, 28, 28) and int labels (N,)."""
    root = Path(os.environ.get("PEFTKIT_FASHION_MNIST", FASHION_MNIST_DIR))
    prefix = {"train": "train", "test": "t10k"}[split]
    images, labels = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
    if not images.is_file() or not labels.is_file():
        raise DataError(f"builtin:fashion_mnist/{split}: no IDX files in {root} "
                        "(apt-get install -y dataset-fashion-mnist, or set PEFTKIT_FASHION_MNIST)")
    x, y = read_idx(images, limit), read_idx(labels, limit)
    if len(x) != len(y):
        raise DataError(f"{images}: {len(x)} images but {len(y)} labels")
    return x, y.astype(np.int64)


@functools.lru_cache(maxsize=1)
def _all_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("builtin:digits: needs scikit-learn (pip install scikit-learn)") from None
    d = load_digits()
    return np.rint(d.images * (255 / 16)).astype(np.uint8), d.target.astype(np.int64)


def digits(split: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as uint8 images (N, 8, 8) scaled 0..16 -> 0..255 and labels; ``split``
    "train" (1,437) or "test" (360) of a fixed permutation, None for all 1,797 in file order."""
    x, y = _all_digits()
    if split is None:
        return x.copy(), y.copy()
    perm = np.random.default_rng(0).permutation(len(x))
    keep = perm[:DIGITS_TEST] if split == "test" else perm[DIGITS_TEST:]
    return x[keep], y[keep]


def split_source(source: str) -> tuple[str, list[int] | None]:
    """A source and its class filter: ``builtin:digits/train?classes=0-4`` -> ("builtin:digits/train", [0, ..., 4]);
    ``classes=`` takes class indices and ranges, comma-separated (``5-9``, ``0,2,4``, ``0-2,7``)."""
    base, sep, query = source.partition("?")
    if not sep:
        return source, None
    key, _, spec = query.partition("=")
    classes: list[int] = []
    try:
        if key != "classes" or not spec:
            raise ValueError
        for part in spec.split(","):
            lo, _, hi = part.partition("-")
            classes += range(int(lo), int(hi or lo) + 1)
    except ValueError:
        raise DataError(f"{source}: expected a class filter like ?classes=0-4 or ?classes=0,2,5-9 after the source") \
            from None
    if not classes:
        raise DataError(f"{source}: the class filter ?{query} names no class")
    return base, sorted(set(classes))


def load_images(source: str, limit: int | None = None) -> tuple[Tensor, list[int], list[str]]:
    """A built-in source as (uint8 images (N, H, W), label indices, the source's class names). A class filter
    (``?classes=0-4``, :func:`split_source`) keeps the images of those classes (``limit``: the first of them); the
    class names stay all of the source's, so label indices are the same with and without it."""
    source, classes = split_source(source)
    name = source.removeprefix("builtin:")
    if source.startswith("builtin:") and name in ("fashion_mnist/train", "fashion_mnist/test"):
        x, y = fashion_mnist(name.split("/")[1], None if classes else limit)
        names = FASHION_MNIST_LABELS
    elif source.startswith("builtin:") and name in ("digits", "digits/train", "digits/test"):
        x, y = digits(name.split("/")[1] if "/" in name else None)
        names = DIGIT_LABELS
    else:
        raise DataError(f"{source}: image tasks read builtin:fashion_mnist/train, builtin:fashion_mnist/test, "
                        "builtin:digits, builtin:digits/train or builtin:digits/test (each with an optional "
                        "?classes=... filter)")
    if classes is not None:
        unknown = [k for k in classes if k >= len(names)]
        if unknown:
            raise DataError(f"{source}: the class filter names {unknown}, but the source has classes 0-{len(names) - 1}")
        keep = np.isin(y, classes)
        x, y = x[keep], y[keep]
    if limit:
        x, y = x[:limit], y[:limit]
    if len(x) == 0:
        raise DataError(f"{source}: no images")
    return torch.from_numpy(np.ascontiguousarray(x)), y.tolist(), list(names)


def to_model_input(images: Tensor, size: int, channels: int = 3, *, imagenet: bool = True) -> Tensor:
    """uint8 (N, H, W) -> float (N, channels, size, size): bilinear resize, then ImageNet mean/std when
    ``imagenet`` (3 channels) or the [-1, 1] range otherwise."""
    x = images.float().div_(255).unsqueeze(1)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp_(0, 1)
    x = x.expand(-1, channels, -1, -1)
    if not imagenet:
        return (x * 2 - 1).contiguous()
    mean = torch.tensor(IMAGENET_MEAN[:channels]).view(1, channels, 1, 1)
    std = torch.tensor(IMAGENET_STD[:channels]).view(1, channels, 1, 1)
    return (x - mean) / std
