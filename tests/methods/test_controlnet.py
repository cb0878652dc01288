"""ControlNet: diffusers' ControlNetModel beside the tiny UNet; its folder format both ways, the conditioning argument,
gradients, and a short `peftkit train` run (task diffusion, control: sobel)."""

from __future__ import annotations

import json

import numpy as np
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import peftkit
from peftkit import ControlNetConfig, LoraConfig, load_controlnet, save_controlnet
from peftkit import tiny_models
from peftkit.config import ConfigError
from peftkit.layers import AdapterLayer
from peftkit.targeting import NotApplicableError

from ..families import FAMILY, nudge_trainable, untouched

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
UNET = FAMILY["unet"]  # sample (B, 4, 8, 8), text (B, 5, 16); block widths 16, 32
WIDTHS = [8, 16]  # conditioning encoder: one halving, so the image is 16 x 16


def _inputs(batch: int = 2):
    g = torch.Generator().manual_seed(7)
    return (torch.randn(batch, 4, 8, 8, generator=g), torch.tensor(10), torch.randn(batch, 5, 16, generator=g),
            torch.rand(batch, 3, 16, 16, generator=g))


@pytest.fixture(scope="module")
def trained():
    """A ControlNet adapter with every parameter moved off its initial value (zero convs included)."""
    model = peftkit.get_peft_model(UNET.model(), ControlNetConfig(conditioning_embedding_out_channels=WIDTHS))
    torch.manual_seed(3)
    nudge_trainable(model, 0.05)
    return model.eval()


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"conditioning_channels": 0}, "conditioning_channels"),
    ({"conditioning_embedding_out_channels": []}, "conditioning_embedding_out_channels"),
    ({"conditioning_embedding_out_channels": [8, 0]}, "conditioning_embedding_out_channels"),
    ({"controlnet_conditioning_channel_order": "gbr"}, "controlnet_conditioning_channel_order"),
    ({"blank_condition": "0"}, "blank_condition"), ({"conditioning_scale": None}, "conditioning_scale"),
])
def test_bad_values_raise_config_error(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        ControlNetConfig(**kwargs)


def test_not_applicable_beyond_diffusers_unets():
    model = FAMILY["bert"].model()
    with untouched(model), pytest.raises(NotApplicableError, match="ControlNet on BertForSequenceClassification"):
        peftkit.get_peft_model(model, ControlNetConfig())


def test_starts_at_the_base_and_copies_the_encoder():
    unet = UNET.model()
    x, t, text, cond = _inputs()
    with torch.no_grad():
        base = unet(x, t, encoder_hidden_states=text).sample
    model = peftkit.get_peft_model(unet, ControlNetConfig(conditioning_embedding_out_channels=WIDTHS))
    net = model.base_model.model.conv_out.adapters["default"].net
    for part in ("conv_in", "time_embedding", "down_blocks", "mid_block"):  # the trainable copy, as from_unet
        mine, theirs = getattr(net, part).state_dict(), getattr(unet, part).state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert all(p.abs().sum() == 0 for p in net.controlnet_down_blocks.parameters())  # zero convs
    with torch.no_grad():
        assert torch.equal(model(x, t, encoder_hidden_states=text, controlnet_cond=cond).sample, base)
    assert model.get_nb_trainable_parameters()[0] == sum(p.numel() for p in net.parameters())


def test_diffusers_folder_gives_the_same_outputs_both_ways(trained, tmp_path):
    from diffusers import ControlNetModel

    x, t, text, cond = _inputs()
    with torch.no_grad():
        ours = trained(x, t, encoder_hidden_states=text, controlnet_cond=cond).sample
    save_controlnet(trained, tmp_path / "cn")
    assert {p.name for p in (tmp_path / "cn").iterdir()} == {"config.json", "diffusion_pytorch_model.safetensors"}
    theirs = ControlNetModel.from_pretrained(tmp_path / "cn")
    plain = UNET.model()  # the same seed-0 base
    with torch.no_grad():
        down, mid = theirs(x, t, encoder_hidden_states=text, controlnet_cond=cond, return_dict=False)
        reference = plain(x, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                          mid_block_additional_residual=mid).sample
        torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)
        assert not torch.allclose(ours, plain(x, t, encoder_hidden_states=text).sample)
        loaded = load_controlnet(UNET.model(), tmp_path / "cn")  # back into peftkit
        torch.testing.assert_close(loaded(x, t, encoder_hidden_states=text, controlnet_cond=cond).sample, ours,
                                   atol=1e-6, rtol=0)
    assert loaded.peft_config["default"].controlnet_config == trained.peft_config["default"].controlnet_config


def test_conditioning_scale_scales_the_residuals(trained):
    from diffusers import ControlNetModel

    x, t, text, cond = _inputs()
    net = trained.base_model.model.conv_out.adapters["default"].net
    half = peftkit.get_peft_model(UNET.model(), ControlNetConfig(conditioning_embedding_out_channels=WIDTHS,
                                                                 conditioning_scale=0.5))
    half.base_model.model.conv_out.adapters["default"].net.load_state_dict(net.state_dict())
    with torch.no_grad():
        down, mid = net(x, t, encoder_hidden_states=text, controlnet_cond=cond, return_dict=False)
        expected = UNET.model()(x, t, encoder_hidden_states=text, down_block_additional_residuals=[d / 2 for d in down],
                                mid_block_additional_residual=mid / 2).sample
        torch.testing.assert_close(half(x, t, encoder_hidden_states=text, controlnet_cond=cond).sample, expected,
                                   atol=1e-6, rtol=0)
    assert isinstance(net, ControlNetModel)


def test_a_wrong_or_missing_image_fails_before_anything_runs(trained):
    x, t, text, cond = _inputs()
    calls = []
    handle = trained.get_base_model().register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=r"controlnet_cond: .*'default' expects .*\(2, 3, 16, 16\).*"
                                             r"got \(2, 3, 8, 8\)"):
            trained(x, t, encoder_hidden_states=text, controlnet_cond=cond[:, :, :8, :8])
        with pytest.raises(ValueError, match=r"controlnet_cond: .*\(2, 3, 16, 16\).*got \(1, 3, 16, 16\)"):
            trained(x, t, encoder_hidden_states=text, controlnet_cond=cond[:1])
        with pytest.raises(ValueError, match=r"controlnet_cond: .*needs a conditioning image of shape "
                                             r"\(2, 3, 16, 16\)"):
            trained(x, t, encoder_hidden_states=text)
        with pytest.raises(ValueError, match="controlnet_cond: .*float tensor"):
            trained(x, t, encoder_hidden_states=text, controlnet_cond=cond.long())
    finally:
        handle.remove()
    assert not calls


def test_blank_condition_stands_for_a_missing_image(trained):
    x, t, text, cond = _inputs()
    blank = peftkit.get_peft_model(UNET.model(), ControlNetConfig(conditioning_embedding_out_channels=WIDTHS,
                                                                  blank_condition=0.25))
    blank.base_model.model.conv_out.adapters["default"].net.load_state_dict(
        trained.base_model.model.conv_out.adapters["default"].net.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(blank(x, t, encoder_hidden_states=text).sample,
                                   trained(x, t, encoder_hidden_states=text,
                                           controlnet_cond=torch.full_like(cond, 0.25)).sample, atol=0, rtol=0)


def test_disabled_the_image_is_ignored(trained):
    x, t, text, cond = _inputs()
    with torch.no_grad():
        base = UNET.model()(x, t, encoder_hidden_states=text).sample
        with trained.disable_adapter():
            torch.testing.assert_close(trained(x, t, encoder_hidden_states=text, controlnet_cond=cond).sample, base,
                                       atol=0, rtol=0)


def test_only_the_controlnet_trains():
    model = peftkit.get_peft_model(UNET.model(), ControlNetConfig(conditioning_embedding_out_channels=WIDTHS))
    torch.manual_seed(4)
    nudge_trainable(model, 0.05)
    x, t, text, cond = _inputs()
    model.train()
    model(x, t, encoder_hidden_states=text, controlnet_cond=cond).sample.pow(2).mean().backward()
    for name, p in model.named_parameters():
        if ".adapters.default.net." in name:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_added_after_lora_it_still_copies_the_base_weights():
    unet = UNET.model()
    reference = {k: v.clone() for k, v in unet.down_blocks.state_dict().items()}
    model = peftkit.get_peft_model(unet, LoraConfig(r=2, target_modules=["to_q", "conv1"]))
    model.add_adapter("cn", ControlNetConfig(conditioning_embedding_out_channels=WIDTHS))
    net = unet.conv_out.adapters["cn"].net
    assert isinstance(unet.down_blocks[0].resnets[0].conv1, AdapterLayer)
    copied = net.down_blocks.state_dict()
    assert copied.keys() == reference.keys() and all(torch.equal(copied[k], reference[k]) for k in copied)


def test_loading_onto_another_unet_is_refused(trained, tmp_path):
    trained.save_pretrained(tmp_path)
    other = tiny_models.unet(cross_attention_dim=24)
    config = ControlNetConfig.from_pretrained(tmp_path)
    with untouched(other), pytest.raises(ValueError, match="controlnet_config: cross_attention_dim is 16"):
        peftkit.get_peft_model(other, config)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "CONTROLNET" and saved["controlnet_config"]["block_out_channels"] == [16, 32]


def test_merging_is_refused(trained):
    with pytest.raises(NotImplementedError, match="ControlNet cannot be merged"):
        trained.merge_adapter()


# -- peftkit train, task diffusion with a control image ---------------------------------------------------------
def test_training_run_learns_and_writes_grids_and_agreement(tmp_path, monkeypatch):
    from PIL import Image

    from peftkit.train import control_task, diffusion_eval, load_recipe, train
    from peftkit.train.diffusion import DiffusionTask

    recipe = yaml.safe_load((CONFIGS / "digits_controlnet.yaml").read_text())
    recipe["model"] = "unet-tiny"  # random weights: tests never pre-train unet-tiny-digits
    recipe["data"].update(train="builtin:digits/train", test="builtin:digits/test", image_size=8, train_rows=200,
                          test_rows=40)
    recipe["train"].update(max_steps=20, log_every=4, save_every=0, lr=5e-3, warmup_ratio=0.0)
    recipe["output_dir"] = str(tmp_path / "run")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.setattr(DiffusionTask, "sample_steps", 4)
    monkeypatch.setattr(DiffusionTask, "samples_per_label", 1)
    monkeypatch.setattr(diffusion_eval, "MEASURE_SAMPLES", 10)
    monkeypatch.setattr(control_task, "AGREE_PER_LABEL", 1)
    summary = train(load_recipe(str(tmp_path / "r.yaml")), quiet=True)
    assert summary["test_loss"] < 0.85 * summary["before_test_loss"]  # ~1.09 -> ~0.8
    # at the start the adapted UNet is the base: the same samples with the adapter on and off
    assert summary["before_control_agreement"] == summary["before_control_agreement_adapter_off"]
    for key in ("control_agreement", "control_agreement_adapter_off"):
        assert -1 <= summary[key] <= 1
    on = np.asarray(Image.open(tmp_path / "run" / "samples_adapter_on.png"))
    assert on.shape == (2 * 8, 10 * 8)  # a row of edge maps above a row of samples, one column per digit
    off = np.asarray(Image.open(tmp_path / "run" / "samples_adapter_off.png"))
    assert np.array_equal(on[:8], off[:8]) and not np.array_equal(on[8:], off[8:])
    from diffusers import ControlNetModel

    net = ControlNetModel.from_pretrained(tmp_path / "run" / "diffusers_controlnet")
    trained = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(v, trained[f"base_model.model.controlnet.{k}"]) for k, v in net.state_dict().items())
