"""`peftkit train` task diffusion: LoRA on a tiny text-conditioned diffusers UNet learning digits, the sample
grids with the adapter on and off, reproducible and resumable noise."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file

from peftkit.train import load_recipe, train
from peftkit.train.diffusion import DiffusionTask, PromptEncoder, prompt_for, save_grid, unet_tiny

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SIZE = 8  # the digits' own resolution keeps a step at ~0.1 s on one core


def _recipe(root: Path, **train_fields) -> Path:
    recipe = yaml.safe_load((CONFIGS / "digits_unet_lora.yaml").read_text())
    recipe["model"] = "unet-tiny"  # random weights: tests never pre-train unet-tiny-digits
    recipe["data"].update(train="builtin:digits/train", test="builtin:digits/test", image_size=SIZE, test_rows=100)
    recipe["train"].update({"max_steps": 80, "log_every": 10, "save_every": 0, "num_threads": 1, **train_fields})
    recipe["output_dir"] = str(root / "run")
    root.mkdir(parents=True, exist_ok=True)
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return root / "recipe.yaml"


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in open(run / "metrics.jsonl") if '"loss"' in line]


def _png(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path))


def test_prompts_and_the_frozen_text_encoder():
    prompts = [prompt_for(str(i)) for i in range(10)]
    assert prompts[3] == "a photo of the digit three" and prompt_for("Ankle boot") == "a photo of a ankle boot"
    encoder = PromptEncoder(prompts, hidden_size=32)
    ids = encoder.ids(prompts)
    assert ids.shape == (10, 7) and ids[:, -1].eq(2).all()  # 6 words + [EOS]
    assert len({tuple(row) for row in ids[:, :-1].tolist()}) == 10 and not ids.eq(1).any()  # no [UNK]
    cond = encoder(prompts)
    assert cond.shape == (10, 7, 32) and not cond.requires_grad
    assert not torch.allclose(cond[3], cond[4])  # the prompts differ in their last word only
    assert torch.equal(cond, PromptEncoder(prompts, hidden_size=32)(prompts))  # fixed weights, no download


def test_unet_lora_run_learns_and_renders_samples(tmp_path, monkeypatch):
    from peftkit.train.commands import load_trained

    monkeypatch.setattr(DiffusionTask, "sample_steps", 8)
    monkeypatch.setattr(DiffusionTask, "samples_per_label", 2)
    summary = train(load_recipe(str(_recipe(tmp_path))), quiet=True)
    run = tmp_path / "run"
    losses = _losses(run)
    assert len(losses) == 8
    first, last = np.mean(losses[:2]), np.mean(losses[-2:])
    assert last < 0.8 * first  # ~1.0 -> ~0.7 on this seed
    assert summary["main_metric"] == "test_loss" and summary["test_loss"] < 0.85 * summary["before_test_loss"]
    # LoRA r=8 on to_q/to_k/to_v/to_out.0 of the 4 transformer blocks' self- and cross-attention (width 16 or 32):
    # 11,008; + proj_in / proj_out of those blocks and conv1 / conv2 of the 8 ResNet blocks: 41,600
    assert summary["trainable_params"] == 52_608
    on, off = _png(run / "samples_adapter_on.png"), _png(run / "samples_adapter_off.png")
    assert on.shape == off.shape == (2 * SIZE, 10 * SIZE) and on.dtype == np.uint8  # 2 rows, 10 digits, grey
    assert not np.array_equal(on, off)

    # adapter off == the base UNet alone, exactly, for the same seed
    model, task = load_trained(str(run))
    task.sample_steps, task.samples_per_label = 8, 2
    model.eval()
    with model.disable_adapter():
        disabled = task.samples(model)
    base = task.samples(unet_tiny(SIZE))
    assert torch.equal(disabled, base)
    save_grid(base, 10, str(tmp_path / "base.png"))
    assert np.array_equal(_png(tmp_path / "base.png"), off)
    adapted = task.samples(model)
    save_grid(adapted, 10, str(tmp_path / "adapted.png"))
    assert np.array_equal(_png(tmp_path / "adapted.png"), on)  # the saved adapter reproduces the grid


def test_noise_is_seeded_and_resumes_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(DiffusionTask, "sample_steps", 2)
    monkeypatch.setattr(DiffusionTask, "samples_per_label", 1)
    fields = {"max_steps": 20, "save_every": 10, "keep_last": 1, "log_every": 5}
    train(load_recipe(str(_recipe(tmp_path / "a", **fields))), quiet=True)
    train(load_recipe(str(_recipe(tmp_path / "b", **fields))), quiet=True)
    wa = load_file(tmp_path / "a" / "run" / "adapter" / "adapter_model.safetensors")
    wb = load_file(tmp_path / "b" / "run" / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # drop everything after the step-10 checkpoint and resume: steps 11..20 draw the same noise again
    run_b = tmp_path / "b" / "run"
    shutil.rmtree(run_b / "adapter")
    (run_b / "summary.json").unlink()
    train(load_recipe(str(tmp_path / "b" / "recipe.yaml"), ["resume=true"]), quiet=True)
    wr = load_file(run_b / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(wa[k], wr[k]) for k in wa)
    assert _losses(run_b) == _losses(tmp_path / "a" / "run")
    c = train(load_recipe(str(_recipe(tmp_path / "c", **fields, seed=1))), quiet=True)
    wc = load_file(tmp_path / "c" / "run" / "adapter" / "adapter_model.safetensors")
    assert c["steps"] == 20 and not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_gradient_checkpointing_on_a_diffusers_unet_trains_the_same_adapter(tmp_path, monkeypatch):
    monkeypatch.setattr(DiffusionTask, "sample_steps", 2)
    monkeypatch.setattr(DiffusionTask, "samples_per_label", 1)
    fields = {"max_steps": 4, "log_every": 2}
    train(load_recipe(str(_recipe(tmp_path / "a", **fields))), quiet=True)
    train(load_recipe(str(_recipe(tmp_path / "b", **fields)), ["train.gradient_checkpointing=true"]), quiet=True)
    wa = load_file(tmp_path / "a" / "run" / "adapter" / "adapter_model.safetensors")
    wb = load_file(tmp_path / "b" / "run" / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0)
    from peftkit.train.loop import Trainer

    trainer = Trainer(load_recipe(str(tmp_path / "b" / "recipe.yaml"), ["train.gradient_checkpointing=true"]), quiet=True)
    trainer.setup()
    assert trainer.model.get_base_model().is_gradient_checkpointing

