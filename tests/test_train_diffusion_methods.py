"""`peftkit train` diffusion tasks beyond UNet LoRA: the recipe's ``diffusion.adapt`` (text encoder, both),
textual inversion's placeholder in the task's text encoder, DreamBooth with text-encoder LoRA exported for
diffusers, and the digit classifier that scores samples with the adapter on and off."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from peftkit.config import ConfigError
from peftkit.train import diffusion_eval, load_recipe, train
from peftkit.train.diffusion import DiffusionTask, PromptEncoder
from peftkit.train.diffusion_eval import digit_classifier, sample_accuracy
from peftkit.train.images import digits, to_model_input
from peftkit.train.recipe import RecipeError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SIZE = 8


@pytest.fixture(autouse=True)
def _fast(monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setattr(DiffusionTask, "sample_steps", 4)
    monkeypatch.setattr(DiffusionTask, "samples_per_label", 2)
    monkeypatch.setattr(diffusion_eval, "MEASURE_SAMPLES", 4)


def _recipe(root: Path, name: str, edit=None, **train_fields) -> Path:
    recipe = yaml.safe_load((CONFIGS / name).read_text())
    recipe["model"] = "unet-tiny"
    recipe["data"].update(image_size=SIZE, test_rows=40)
    recipe["train"].update({"max_steps": 6, "log_every": 3, "save_every": 0, "num_threads": 1, **train_fields})
    recipe["output_dir"] = str(root / "run")
    if edit:
        edit(recipe)
    root.mkdir(parents=True, exist_ok=True)
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return root / "recipe.yaml"


def _png(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path))


def test_digit_classifier_is_deterministic_and_reads_real_digits():
    clf = digit_classifier(SIZE)
    assert clf.test_accuracy > 0.95
    again = digit_classifier.__wrapped__(SIZE)  # trained anew: the same weights, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(clf.state_dict().values(), again.state_dict().values()))
    x, y = digits("test")
    images = to_model_input(torch.from_numpy(x), SIZE, 1, imagenet=False)
    assert sample_accuracy(images, y.tolist()) == pytest.approx(clf.test_accuracy)
    assert sample_accuracy(images[:4], [int(y[0])] * 4) == np.mean(clf.predict(images[:4]).numpy() == y[0])
    with pytest.raises(ValueError, match="4 images but 3 classes"):
        sample_accuracy(images[:4], [0, 1, 2])


def test_textual_inversion_learns_one_row_of_the_text_encoder(tmp_path):
    from peftkit.train.commands import load_trained

    summary = train(load_recipe(str(_recipe(tmp_path, "digits_textual_inversion.yaml"))), quiet=True)
    run = tmp_path / "run"
    assert summary["trainable_params"] == 32  # one vector of the text encoder's width
    assert summary["test_loss"] < summary["before_test_loss"]
    for key in ("sample_accuracy", "sample_accuracy_adapter_off", "before_sample_accuracy"):
        assert 0.0 <= summary[key] <= 1.0
    assert summary["before_sample_accuracy"] == summary["sample_accuracy_adapter_off"]  # starts at the base
    config = yaml.safe_load((run / "config.yaml").read_text())
    # vocabulary: [PAD] [UNK] [EOS] + the 15 words of the ten class prompts; the placeholder is id 18
    assert config["peft"]["token_indices"] == [18] and config["diffusion"]["adapt"] == ["text_encoder"]
    weights = load_file(run / "adapter" / "adapter_model.safetensors")
    assert list(weights) == ["base_model.model.text_encoder.embeddings.token_embedding"
                             ".trainable_tokens_delta"]
    rows = next(iter(weights.values()))
    embeds = load_file(run / "diffusers_textual_inversion" / "learned_embeds.safetensors")
    assert list(embeds) == ["<digit3>"] and torch.equal(embeds["<digit3>"], rows) and rows.shape == (1, 32)
    on, off = _png(run / "samples_adapter_on.png"), _png(run / "samples_adapter_off.png")
    assert on.shape == off.shape == (2 * SIZE, SIZE) and not np.array_equal(on, off)

    model, task = load_trained(str(run))
    model.eval()
    text = model.get_base_model().text_encoder
    ids = task.cond[:1]
    assert ids[0].tolist()[:6] == task.encoder.ids(["a photo of the digit digit"])[0].tolist()[:5] + [18]
    digit = task.encoder.ids(["a photo of the digit digit"])
    with torch.no_grad():
        learned = text(input_ids=ids).last_hidden_state
        with model.disable_adapter():  # off: the placeholder reads as its initializer word, exactly
            assert torch.equal(text(input_ids=ids).last_hidden_state, text(input_ids=digit).last_hidden_state)
    assert not torch.allclose(learned, text(input_ids=digit).last_hidden_state.detach(), atol=1e-4)
    assert not any(p.requires_grad for p in model.get_base_model().unet.parameters())


def test_textual_inversion_recipe_errors(tmp_path):
    path = _recipe(tmp_path, "digits_textual_inversion.yaml")
    cases = [
        (["diffusion.adapt=[unet]"], "diffusion.adapt: method textual_inversion trains rows of the text encoder"),
        (["diffusion.adapt=[]"], "diffusion.adapt: expected one or both of"),
        (["diffusion.adapt=[vae]"], "diffusion.adapt: expected names among unet, text_encoder, got 'vae'"),
        (["diffusion.adapt=[unet, unet]"], "diffusion.adapt: 'unet' is listed twice"),
        (["dreambooth.instance_prompt=a photo of sks digit"], "dreambooth.instance_prompt: expected the placeholder"),
        (["peft.placeholder_token=null"], "peft.placeholder_token: expected the new word"),
        (["task=diffusion", "dreambooth.subject=3", "dreambooth.instance_prompt=x", "dreambooth.prior={}"], "dreambooth"),
        (["task=seq_cls", "diffusion.adapt=[text_encoder]"], "dreambooth"),
    ]
    for overrides, message in cases:
        with pytest.raises(RecipeError) as err:
            load_recipe(str(path), overrides)
        assert str(err.value).startswith(message), (overrides, str(err.value))
    recipe = yaml.safe_load(path.read_text())
    recipe.pop("dreambooth")
    recipe.update(task="diffusion")
    (tmp_path / "d.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError, match="^task: textual_inversion learns a word for one subject's images"):
        load_recipe(str(tmp_path / "d.yaml"))
    # a placeholder that is already a word of the text encoder: refused before training, naming the field
    recipe = load_recipe(str(path), ["peft.placeholder_token=seven", "dreambooth.instance_prompt=a photo of seven"])
    with pytest.raises(ConfigError, match=r"^peft\.placeholder_token: expected a word not in the tokenizer's "
                                          r"vocabulary, got 'seven'"):
        train(recipe, quiet=True)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    recipe = load_recipe(str(path), ["peft.initializer_token=no such"])
    with pytest.raises(ConfigError, match=r"^peft\.initializer_token: expected a word the tokenizer maps to a single"):
        train(recipe, quiet=True)


def _with_text_encoder_lora(recipe):
    recipe["diffusion"] = {"adapt": ["unet", "text_encoder"]}
    recipe["peft"]["target_modules"] += ["q_proj", "k_proj", "v_proj", "out_proj"]
    recipe["dreambooth"]["prior"].update(num_class_images=4, class_sample_steps=2)


def test_dreambooth_text_encoder_lora_loads_into_a_pipeline(tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from peftkit.train.commands import load_trained
    from peftkit.train.diffusion import unet_tiny

    summary = train(load_recipe(str(_recipe(tmp_path, "digits_dreambooth_lora.yaml", _with_text_encoder_lora))),
                    quiet=True)
    # the UNet's 52,608 (as UNet-only DreamBooth) + r=8 on q/k/v/out of the 2 text layers: 2 * 4 * 8 * (32 + 32)
    assert summary["trainable_params"] == 52_608 + 4_096
    run = tmp_path / "run"
    with safe_open(str(run / "diffusers_lora" / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys, meta = sorted(f.keys()), json.loads(f.metadata()["lora_adapter_metadata"])
    text_keys = [k for k in keys if k.startswith("text_encoder.")]
    assert len(keys) - len(text_keys) == 2 * (4 * 8 + 2 * 4 + 2 * 8) and len(text_keys) == 2 * 4 * 2
    assert "text_encoder.encoder.layers.1.self_attn.out_proj.lora_B.weight" in text_keys
    assert meta["unet.r"] == meta["text_encoder.r"] == 8

    model, task = load_trained(str(run))
    model.eval()
    base_text = PromptEncoder(task.prompts, 32).model  # seed-0 weights: the run's text encoder before training
    pipe = StableDiffusionPipeline(vae=None, text_encoder=base_text, tokenizer=None, unet=unet_tiny(SIZE),
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    with torch.no_grad():
        before = pipe.text_encoder(input_ids=task.cond).last_hidden_state
    pipe.load_lora_weights(str(run / "diffusers_lora"))
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, 1, SIZE, SIZE, generator=g), torch.tensor([10, 700])
    with torch.no_grad():
        ours = model(x, t, encoder_hidden_states=task.cond).sample  # token ids: the wrapper encodes them
        hidden = pipe.text_encoder(input_ids=task.cond).last_hidden_state
        theirs = pipe.unet(x, t, encoder_hidden_states=hidden).sample
        mine = model.get_base_model().text_encoder(input_ids=task.cond).last_hidden_state
    assert torch.allclose(hidden, mine, atol=1e-5) and (hidden - before).abs().max() > 1e-4
    assert torch.allclose(theirs, ours, atol=1e-5)
