"""`peftkit train` task dreambooth: the prior-preservation loss, class images drawn by the base UNet with the
adapter off, the diffusers-format LoRA loading into a fresh StableDiffusionPipeline, and recipe errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from peftkit.train import load_recipe, train
from peftkit.train.diffusion import sample_images, unet_tiny
from peftkit.train.dreambooth import prior_preservation_loss
from peftkit.train.dreambooth_task import DreamBoothTask, generate_class_images
from peftkit.train.images import load_images, to_model_input
from peftkit.train.recipe import RecipeError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SIZE = 8


def _recipe(root: Path, prior: dict | None = None, **train_fields) -> Path:
    recipe = yaml.safe_load((CONFIGS / "digits_dreambooth_lora.yaml").read_text())
    recipe["model"] = "unet-tiny"  # random weights: tests never pre-train unet-tiny-digits
    recipe["dreambooth"]["subject"] = "3"
    recipe["data"].update(image_size=SIZE, test_rows=120)
    recipe["dreambooth"]["prior"].update({"num_class_images": 6, "class_sample_steps": 3, **(prior or {})})
    recipe["train"].update({"max_steps": 30, "log_every": 5, "save_every": 0, "num_threads": 1, **train_fields})
    recipe["output_dir"] = str(root / "run")
    root.mkdir(parents=True, exist_ok=True)
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return root / "recipe.yaml"


def _task(tmp_path: Path, **prior) -> DreamBoothTask:
    task = DreamBoothTask(load_recipe(str(_recipe(tmp_path, prior))))
    task.load_data()
    return task


def test_prior_preservation_loss_is_its_definition(tmp_path):
    # hand-computed: subject rows (2) off by 1 everywhere -> MSE 1; class rows (2) off by 2 / 0 -> MSE (4 + 0) / 2
    pred = torch.zeros(4, 1, 2, 2)
    noise = torch.cat([torch.ones(2, 1, 2, 2), torch.full((1, 1, 2, 2), 2.0), torch.zeros(1, 1, 2, 2)])
    assert prior_preservation_loss(pred, noise, 2, 0.5).item() == pytest.approx(1.0 + 0.5 * 2.0)
    assert prior_preservation_loss(pred, noise, 2, 0.0).item() == pytest.approx(1.0)
    assert prior_preservation_loss(pred[:2], noise[:2], 2, 3.0).item() == pytest.approx(1.0)  # no class rows

    # the task's loss on a fixed batch: subject rows first, then as many class rows with the class prompt
    task = _task(tmp_path, prior_loss_weight=0.25)
    unet = task.load_model()
    torch.manual_seed(0)
    batch = task.batch([0, 1, 2])
    assert batch["sample"].shape == (6, 1, SIZE, SIZE) and batch["n_instance"] == 3
    assert torch.equal(batch["encoder_hidden_states"][:3], task.cond[[0, 0, 0]])
    assert torch.equal(batch["encoder_hidden_states"][3:], task.cond[[1, 1, 1]])
    with torch.no_grad():
        pred = unet(batch["sample"], batch["timestep"], encoder_hidden_states=batch["encoder_hidden_states"]).sample
        want = ((pred[:3] - batch["noise"][:3]) ** 2).mean() + 0.25 * ((pred[3:] - batch["noise"][3:]) ** 2).mean()
        got = task.loss(unet, batch)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    # class image i % num_class_images goes with subject example i, noised at its own t
    x0 = task.scheduler.add_noise(task.class_images[[0, 1, 2]], batch["noise"][3:], batch["timestep"][3:])
    assert torch.allclose(batch["sample"][3:], x0)


def test_class_images_come_from_the_base_unet_with_the_adapter_off(tmp_path):
    from peftkit import LoraConfig, get_peft_model

    task = _task(tmp_path)
    task.load_model()
    cond = task.cond[1:2].expand(6, -1, -1)
    base = sample_images(unet_tiny(SIZE), cond, (1, SIZE, SIZE), steps=3, seed=0)
    assert task.class_images.shape == (6, 1, SIZE, SIZE) and torch.equal(task.class_images, base)

    # on a PEFT model with a non-zero LoRA, generation disables the adapter (spied) and matches the base
    model = get_peft_model(unet_tiny(SIZE), LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(hash(name) % 1000))
    calls = []
    real = type(model).disable_adapter

    def spy(self):
        calls.append(1)
        return real(self)

    type(model).disable_adapter, saved = spy, real
    try:
        gen = generate_class_images(model, task.cond[1:2], 6, (1, SIZE, SIZE), steps=3, seed=0, batch_size=128)
    finally:
        type(model).disable_adapter = saved
    assert calls == [1] and torch.equal(gen, base)
    on = sample_images(model, cond, (1, SIZE, SIZE), steps=3, seed=0)
    assert not torch.allclose(on, base, atol=1e-3)  # the adapter does change samples when on

    data = _task(tmp_path / "d", class_images_from="data")
    data.load_model()
    x, y, names = load_images("builtin:digits/train")
    others = x[[i for i, label in enumerate(y) if names[label] != "3"][:6]]
    assert torch.equal(data.class_images, to_model_input(others, SIZE, 1, imagenet=False))


def test_run_trains_and_its_diffusers_lora_loads_into_a_fresh_pipeline(tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from peftkit.train.commands import load_trained

    summary = train(load_recipe(str(_recipe(tmp_path))), quiet=True)
    run = tmp_path / "run"
    losses = [json.loads(line)["loss"] for line in open(run / "metrics.jsonl") if '"loss"' in line]
    assert len(losses) == 6 and summary["test_loss"] < 0.95 * summary["before_test_loss"]
    # as task diffusion: r=8 on q, k, v, out of 8 attentions (11,008), proj_in / proj_out of the 4 transformer blocks
    # and conv1 / conv2 of the 8 ResNet blocks
    assert summary["trainable_params"] == 52_608
    for name in ("class_images.png", "samples_adapter_on.png", "samples_adapter_off.png"):
        assert (run / name).is_file()

    path = run / "diffusers_lora" / "pytorch_lora_weights.safetensors"
    with safe_open(str(path), "pt") as f:
        keys, meta = sorted(f.keys()), f.metadata()
    # A/B x (q,k,v,out x 8 attentions (self + cross in the 4 transformer blocks: down 1, mid 1, up 2) + proj_in /
    # proj_out x 4 transformer blocks + conv1 / conv2 x 8 ResNet blocks (down 2, mid 2, up 4))
    assert len(keys) == 2 * (4 * 8 + 2 * 4 + 2 * 8) and all(k.startswith("unet.") for k in keys)
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight" in keys
    assert "unet.up_blocks.1.resnets.1.conv2.lora_B.weight" in keys
    assert json.loads(meta["lora_adapter_metadata"])["unet.r"] == 8

    model, task = load_trained(str(run))
    model.eval()
    pipe = StableDiffusionPipeline(vae=None, text_encoder=task.encoder.model, tokenizer=None, unet=unet_tiny(SIZE),
                                   scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.load_lora_weights(str(run / "diffusers_lora"))
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, 1, SIZE, SIZE, generator=g), torch.tensor([10, 700])
    with torch.no_grad():
        ours = model(x, t, encoder_hidden_states=task.cond).sample
        theirs = pipe.unet(x, t, encoder_hidden_states=task.cond).sample
        base = unet_tiny(SIZE)(x, t, encoder_hidden_states=task.cond).sample
    assert torch.allclose(theirs, ours, atol=1e-5)
    assert (ours - base).abs().max() > 1e-3  # the LoRA is trained, so the match is not base == base


@pytest.mark.parametrize("override, field", [
    ("dreambooth.prior.class_prompt=null", "dreambooth.prior.class_prompt"),
    ("dreambooth.prior.class_prompt=' '", "dreambooth.prior.class_prompt"),
    ("dreambooth.prior.num_class_images=0", "dreambooth.prior.num_class_images"),
    ("dreambooth.prior.prior_loss_weight=-1", "dreambooth.prior.prior_loss_weight"),
    ("dreambooth.prior.class_images_from=web", "dreambooth.prior.class_images_from"),
    ("dreambooth.instance_prompt=''", "dreambooth.instance_prompt"),
    ("task=diffusion", "dreambooth"),
])
def test_bad_recipe_fields_fail_before_training(tmp_path, override, field):
    with pytest.raises(RecipeError) as err:
        load_recipe(str(_recipe(tmp_path)), [override])
    assert str(err.value).startswith(field + ":")


def test_prior_fields_are_free_without_prior_preservation(tmp_path):
    recipe = load_recipe(str(_recipe(tmp_path)), ["dreambooth.prior.with_prior_preservation=false",
                                                  "dreambooth.prior.class_prompt=null"])
    task = DreamBoothTask(recipe)
    task.load_data()
    task.load_model()
    assert task.class_images is None and task.cond.shape[0] == 1
    torch.manual_seed(0)
    assert task.batch([0, 1])["sample"].shape[0] == 2
