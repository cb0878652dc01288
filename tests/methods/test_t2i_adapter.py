"""T2I-Adapter: diffusers' T2IAdapter beside the tiny UNet; its folder format both ways, the fit check, the
conditioning argument, gradients; the recipe's control section (task diffusion) and its image transforms."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import peftkit
from peftkit import ControlNetConfig, T2IAdapterConfig, load_t2i_adapter, save_t2i_adapter, tiny_models
from peftkit.config import ConfigError
from peftkit.targeting import NotApplicableError
from peftkit.train import load_recipe
from peftkit.train.control import agreement, blur, condition_images, control_problem, fit_to_adapter, sobel
from peftkit.train.control_task import ControlDiffusionTask, interleave_rows
from peftkit.train.diffusion import METHOD_TASKS
from peftkit.train.recipe import RecipeError

from ..families import FAMILY, nudge_trainable, untouched

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
UNET = FAMILY["unet"]  # sample (B, 4, 8, 8), text (B, 5, 16); block widths 16, 32


def _inputs(batch: int = 2):
    g = torch.Generator().manual_seed(7)
    return (torch.randn(batch, 4, 8, 8, generator=g), torch.tensor(10), torch.randn(batch, 5, 16, generator=g),
            torch.rand(batch, 3, 16, 16, generator=g))


@pytest.fixture(scope="module")
def adapted():
    model = peftkit.get_peft_model(UNET.model(), T2IAdapterConfig(downscale_factor=2, num_res_blocks=1))
    torch.manual_seed(3)
    nudge_trainable(model, 0.05)
    return model.eval()


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"conditioning_channels": 0}, "conditioning_channels"), ({"downscale_factor": 1.5}, "downscale_factor"),
    ({"num_res_blocks": 0}, "num_res_blocks"), ({"channels": [16, -1]}, "channels"),
    ({"blank_condition": True}, "blank_condition"),
])
def test_bad_values_raise_config_error(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        T2IAdapterConfig(**kwargs)


def test_features_must_fit_the_unet():
    model = FAMILY["gpt2"].model()
    with untouched(model), pytest.raises(NotApplicableError, match="T2I-Adapter on GPT2LMHeadModel"):
        peftkit.get_peft_model(model, T2IAdapterConfig())
    unet = UNET.model()
    with untouched(unet), pytest.raises(ValueError, match=r"T2IAdapterConfig.channels: \[16, 16\].*\[16, 32\]"):
        peftkit.get_peft_model(unet, T2IAdapterConfig(channels=[16, 16]))
    # a plain DownBlock2D before the last block takes its feature after downsampling, at half the adapter's size
    odd = tiny_models.unet(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                           up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    with untouched(odd), pytest.raises(ValueError, match=r"down block 0 \(DownBlock2D\) takes its feature after"):
        peftkit.get_peft_model(odd, T2IAdapterConfig())


def test_diffusers_folder_gives_the_same_outputs_both_ways(adapted, tmp_path):
    from diffusers import T2IAdapter

    x, t, text, cond = _inputs()
    with torch.no_grad():
        ours = adapted(x, t, encoder_hidden_states=text, adapter_cond=cond).sample
    save_t2i_adapter(adapted, tmp_path / "t2i")
    theirs = T2IAdapter.from_pretrained(tmp_path / "t2i")
    assert theirs.config.channels == [16, 32] and theirs.config.downscale_factor == 2
    plain = UNET.model()
    with torch.no_grad():
        features = [f * 1.0 for f in theirs(cond)]  # as StableDiffusionAdapterPipeline (adapter_conditioning_scale 1)
        assert [tuple(f.shape) for f in features] == [(2, 16, 8, 8), (2, 32, 4, 4)]
        reference = plain(x, t, encoder_hidden_states=text, down_intrablock_additional_residuals=features).sample
        torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)
        assert not torch.allclose(ours, plain(x, t, encoder_hidden_states=text).sample)
        loaded = load_t2i_adapter(UNET.model(), tmp_path / "t2i")
        torch.testing.assert_close(loaded(x, t, encoder_hidden_states=text, adapter_cond=cond).sample, ours,
                                   atol=1e-6, rtol=0)


def test_a_wrong_image_fails_before_anything_runs_and_disabled_it_is_ignored(adapted):
    x, t, text, cond = _inputs()
    calls = []
    handle = adapted.get_base_model().register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=r"adapter_cond: T2I-Adapter adapter 'default' expects .*\(2, 3, 16, 16\)"
                                             r".*got \(2, 1, 16, 16\)"):
            adapted(x, t, encoder_hidden_states=text, adapter_cond=cond[:, :1])
        with pytest.raises(ValueError, match="adapter_cond: .*needs a conditioning image"):
            adapted(x, t, encoder_hidden_states=text)
    finally:
        handle.remove()
    assert not calls
    with torch.no_grad(), adapted.disable_adapter():
        torch.testing.assert_close(adapted(x, t, encoder_hidden_states=text, adapter_cond=cond).sample,
                                   UNET.model()(x, t, encoder_hidden_states=text).sample, atol=0, rtol=0)


def test_only_the_adapter_trains_and_it_stacks_with_a_controlnet():
    model = peftkit.get_peft_model(UNET.model(), T2IAdapterConfig(downscale_factor=2, num_res_blocks=1))
    x, t, text, cond = _inputs()
    model.train()
    model(x, t, encoder_hidden_states=text, adapter_cond=cond).sample.pow(2).mean().backward()
    for name, p in model.named_parameters():
        if ".adapters.default.net." in name:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    # a ControlNet beside it: both active, each with its own argument
    model.add_adapter("cn", ControlNetConfig(conditioning_embedding_out_channels=[8, 16]))
    model.base_model.set_adapter(["default", "cn"])
    model.eval()
    with torch.no_grad():
        both = model(x, t, encoder_hidden_states=text, adapter_cond=cond, controlnet_cond=cond).sample
        with pytest.raises(ValueError, match="controlnet_cond: ControlNet adapter 'cn' needs"):
            model(x, t, encoder_hidden_states=text, adapter_cond=cond)
        model.base_model.set_adapter("default")  # the ControlNet starts at zero: both equal the T2I-Adapter alone
        torch.testing.assert_close(both, model(x, t, encoder_hidden_states=text, adapter_cond=cond).sample,
                                   atol=1e-6, rtol=0)


# -- the recipe section and its images ---------------------------------------------------------------------------
def test_sobel_blur_and_agreement():
    img = -torch.ones(1, 1, 8, 8)
    img[..., :, 4:] = 1.0  # a vertical step edge between columns 3 and 4
    edges = sobel(img)
    assert edges.shape == (1, 1, 8, 8) and edges.max() == 1
    assert torch.equal(edges[0, 0, :, 3:5], torch.ones(8, 2)) and edges[0, 0, :, :3].abs().sum() == 0
    smooth = blur(img, 1.0)
    assert 0 < smooth[0, 0, 0, 3] < smooth[0, 0, 0, 4] < 1 and torch.equal(smooth[..., 0], torch.zeros(1, 1, 8))
    torch.testing.assert_close(smooth + smooth.flip(3), torch.ones_like(smooth))  # symmetric about the edge
    spec = type("Spec", (), {"condition": "sobel", "blur_sigma": 1.0})()
    assert agreement(img, condition_images(img, spec), spec) == pytest.approx(1.0)
    assert agreement(img, condition_images(-img.transpose(2, 3), spec), spec) < 0.5
    fitted = fit_to_adapter(edges, 3, 2)
    assert fitted.shape == (1, 3, 16, 16) and torch.equal(fitted[:, 0], fitted[:, 2])
    rows = interleave_rows(torch.zeros(4, 1, 2, 2), torch.ones(4, 1, 2, 2), 2)
    assert rows[:, 0, 0, 0].tolist() == [0, 0, 1, 1, 0, 0, 1, 1]


def test_recipe_section_is_checked(tmp_path):
    tree = yaml.safe_load((CONFIGS / "digits_t2i_adapter.yaml").read_text())
    tree["output_dir"] = str(tmp_path / "run")

    def load(**changes):
        (tmp_path / "r.yaml").write_text(yaml.safe_dump({**tree, **changes}))
        return load_recipe(str(tmp_path / "r.yaml"))

    recipe = load()
    assert recipe.task == "diffusion" and recipe.control.condition == "blur" and control_problem(recipe) is None
    assert METHOD_TASKS["t2i_adapter"] is METHOD_TASKS["controlnet"] is ControlDiffusionTask
    for changes, message in [
        ({"control": {"condition": "canny"}}, "control.condition: expected one of sobel, blur, got 'canny'"),
        ({"control": {"condition": "blur", "blur_sigma": 0}}, "control.blur_sigma: expected a finite number > 0"),
        ({"method": "lora", "peft": {"r": 2}},
         r"control: read by task diffusion with a method that takes a conditioning image \(controlnet, t2i_adapter\); "
         "got task diffusion, method lora"),
        ({"task": "dreambooth"}, "control: read by task diffusion"),
        ({"diffusion": {"adapt": ["unet", "text_encoder"]}},
         "diffusion.adapt: method t2i_adapter rides the UNet alone"),
    ]:
        with pytest.raises(RecipeError, match=message):
            load(**changes)
