"""`peftkit train` task image_cls: the IDX reader, the built-in image sources, a tiny ViT learning digits
from a recipe, and the real EfficientNet-lite0 (ImageNet weights) with LoRA on its convolutions."""

from __future__ import annotations

import gzip
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from peftkit.train import load_recipe, train
from peftkit.train.data import DataError
from peftkit.train.tasks import TASKS
from peftkit.train.images import DIGIT_LABELS, FASHION_MNIST_LABELS, load_images, read_idx
from peftkit.train.vision import FrozenBatchNorm2d, efficientnet_lite0, efficientnet_weights_path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _write_idx(path: Path, array: np.ndarray, code: int, compress: bool) -> None:
    raw = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw += array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def test_read_idx_values_and_shapes(tmp_path):
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5) * 4
    labels = np.array([7, -2, 300000], dtype=np.int32)
    _write_idx(tmp_path / "images.gz", images, 0x08, compress=True)
    _write_idx(tmp_path / "labels", labels, 0x0C, compress=False)
    got = read_idx(tmp_path / "images.gz")
    assert got.shape == (3, 4, 5) and got.dtype == np.uint8
    assert got[2, 3, 4] == 236 and np.array_equal(got, images)
    assert read_idx(tmp_path / "labels").tolist() == [7, -2, 300000]  # big-endian int32 -> native
    assert np.array_equal(read_idx(tmp_path / "images.gz", limit=2), images[:2])
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + b"\0" * 8)
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes((tmp_path / "labels").read_bytes()[:-1])
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "short")


def test_fashion_mnist_source_reads_the_real_files():
    x, y, names = load_images("builtin:fashion_mnist/test", 5)
    assert x.shape == (5, 28, 28) and x.dtype == torch.uint8
    assert y == [9, 2, 1, 1, 6]  # the official test set opens with an ankle boot, a pullover, ...
    assert int(x.sum()) == 284002
    assert names == FASHION_MNIST_LABELS and names[9] == "Ankle boot"


def test_digits_source_split_sizes():
    train_x, train_y, names = load_images("builtin:digits/train")
    test_x, test_y, _ = load_images("builtin:digits/test")
    all_x, all_y, _ = load_images("builtin:digits")
    assert names == DIGIT_LABELS == [str(i) for i in range(10)]
    assert (len(train_y), len(test_y), len(all_y)) == (1437, 360, 1797)
    assert train_x.shape == (1437, 8, 8) and int(all_x.max()) == 255
    rows = lambda x: sorted(bytes(r) for r in x.reshape(len(x), -1).numpy())  # noqa: E731
    assert rows(torch.cat([train_x, test_x])) == rows(all_x)  # a partition of all 1,797 images
    assert sorted(train_y + test_y) == sorted(all_y) and set(test_y) == set(range(10))
    again, _, _ = load_images("builtin:digits/test")
    assert torch.equal(again, test_x)  # the split is fixed
    assert len(load_images("builtin:digits/train", 100)[1]) == 100


def test_tasks_are_registered():
    assert {"seq_cls", "causal_lm", "image_cls", "diffusion"} <= set(TASKS)


def test_vit_tiny_learns_digits_from_a_recipe(tmp_path):
    from peftkit.train.commands import evaluate

    recipe = yaml.safe_load((CONFIGS / "digits_vit_lora.yaml").read_text())
    recipe["output_dir"] = str(tmp_path / "run")
    recipe["train"].update(max_steps=200, lr=1.5e-2, save_every=0, num_threads=1)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    summary = train(load_recipe(str(tmp_path / "recipe.yaml")), quiet=True)
    assert summary["before_test_accuracy"] < 0.25  # chance is 0.1
    assert summary["test_accuracy"] >= 0.75  # 0.83 on this seed; 0.92 with the full recipe
    # LoRA r=8 on q_proj and v_proj of 4 layers of width 64, plus the 10-way head (64*10 + 10)
    assert summary["trainable_params"] == 4 * 2 * 8 * (64 + 64) + (64 * 10 + 10)
    assert summary["labels"] == DIGIT_LABELS
    run = tmp_path / "run"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["peft"]["modules_to_save"] == ["classifier"]
    weights = load_file(run / "adapter" / "adapter_model.safetensors")
    assert weights["base_model.model.classifier.weight"].shape == (10, 64)
    # the run reloads from its folder alone (fixed base weights) and scores the same
    assert evaluate(str(run))["test_accuracy"] == summary["test_accuracy"]


def test_efficientnet_lite0_loads_the_pretrained_weights():
    model = efficientnet_lite0(num_labels=10, image_size=32)
    state = torch.load(efficientnet_weights_path(), map_location="cpu", weights_only=True)
    assert len(state) == 296
    own = model.state_dict()
    assert set(own) == set(state)
    for key, value in state.items():
        if not key.startswith("_fc."):
            assert torch.equal(own[key], value), key
    assert own["_fc.weight"].shape == (10, 1280) and state["_fc.weight"].shape == (1000, 1280)
    # a known statistic of the ImageNet stem filters in efficientnet-lite0-57934424.pth
    assert float(model._conv_stem.weight.double().sum()) == pytest.approx(-26.811376610887237, abs=1e-9)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 49 and all(type(m) is FrozenBatchNorm2d and not m.training for m in norms)
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_fashion_mnist_efficientnet_recipe_trains_lora_on_the_convolutions(tmp_path):
    recipe = load_recipe(str(CONFIGS / "fashion_mnist_efficientnet_lora.yaml"), [
        "train.max_steps=3", "train.batch_size=8", "train.save_every=0", "train.num_threads=1", "train.log_every=1",
        "data.train_rows=48", "data.test_rows=32", "data.image_size=32", f"output_dir={tmp_path / 'run'}"])
    summary = train(recipe, quiet=True)
    base = efficientnet_lite0(10, 32)
    targets = [m for n, m in base.named_modules() if n.endswith(("_expand_conv", "_project_conv", "_conv_head"))]
    assert len(targets) == 32 and all(m.kernel_size == (1, 1) and m.groups == 1 for m in targets)
    lora = sum(8 * (m.in_channels + m.out_channels) for m in targets)
    assert summary["trainable_params"] == lora + 1280 * 10 + 10 == 195_082
    assert summary["labels"] == FASHION_MNIST_LABELS and 0 <= summary["test_accuracy"] <= 1
    weights = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert weights["base_model.model._blocks.0._project_conv.lora_A.weight"].shape == (8, 32, 1, 1)
    assert weights["base_model.model._fc.weight"].shape == (10, 1280)
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "run" / "metrics.jsonl") if '"loss"' in line]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert os.path.isfile(tmp_path / "run" / "summary.json")
