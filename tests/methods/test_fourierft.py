"""FourierFT: the spectral math, config validation, and compatibility with Hugging Face PEFT."""

from __future__ import annotations

import dataclasses

import peft
import pytest
import torch
from safetensors.torch import load_file

import peftkit
from peftkit.config import ConfigError
from peftkit.methods.fourierft import FourierFTAdapter, FourierFTConfig, fourier_delta, spectral_locations

from ..families import FAMILY

KW = {"n_frequency": 16, "scaling": 20.0}


def configs(name: str, **kwargs):
    """The same config for both libraries (default targets: the role table must agree with PEFT's mapping)."""
    extra = {"task_type": FAMILY[name].task_type} if FAMILY[name].task_type else {}
    kw = {**KW, **extra, **kwargs}
    return peft.FourierFTConfig(**kw), FourierFTConfig(**kw)


def test_config_fields_and_defaults_match_peft():
    ours = {f.name: f for f in dataclasses.fields(FourierFTConfig)}
    theirs = {f.name: f for f in dataclasses.fields(peft.FourierFTConfig)}
    assert set(ours) == set(theirs)
    a, b = FourierFTConfig(), peft.FourierFTConfig()
    for name in ("n_frequency", "scaling", "random_loc_seed", "fan_in_fan_out", "bias", "init_weights",
                 "target_modules", "layers_to_transform", "n_frequency_pattern"):
        assert getattr(a, name) == getattr(b, name), name
    assert a.peft_type == "FOURIERFT" and a.n_frequency == 1000 and a.scaling == 150.0 and a.random_loc_seed == 777


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"n_frequency": 0}, "n_frequency"),
        ({"n_frequency": 2.5}, "n_frequency"),
        ({"scaling": "big"}, "scaling"),
        ({"random_loc_seed": None}, "random_loc_seed"),
        ({"bias": "lora_only"}, "bias"),
        ({"init_weights": "zeros"}, "init_weights"),
        ({"n_frequency_pattern": {"q_proj": 0}}, "n_frequency_pattern"),
        ({"target_modules": ".*q_proj", "layers_to_transform": [0]}, "layers_to_transform"),
        ({"layers_pattern": "layers"}, "layers_pattern"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=f"FourierFTConfig.{field}"):
        FourierFTConfig(**kwargs)


def test_too_many_frequencies_for_a_layer_is_an_error():
    model = FAMILY["llama"].model()
    # llama's k_proj is 32 -> 16: a 512-entry grid
    with pytest.raises(ValueError, match="n_frequency=600 exceeds"):
        peftkit.get_peft_model(model, FourierFTConfig(n_frequency=600, target_modules=["k_proj"]))
    assert not any(isinstance(m, peftkit.AdapterLayer) for m in model.modules()), "model left modified"


def test_locations_and_delta_equal_peft():
    layer = torch.nn.Linear(12, 7)
    cfg = peft.FourierFTConfig(n_frequency=20, random_loc_seed=5, target_modules=["lin"])
    from peft.tuners.fourierft.layer import FourierFTLinear

    ref = FourierFTLinear(layer, "default", cfg, n_frequency=20)
    rows, cols = spectral_locations(7, 12, 20, 5)
    assert torch.equal(torch.stack([rows, cols]), ref.indices["default"])
    spectrum = ref.fourierft_spectrum["default"].detach()
    ours = fourier_delta(spectrum, rows, cols, 7, 12, cfg.scaling)
    torch.testing.assert_close(ours, ref.get_delta_weight("default"), atol=0, rtol=0)
    # the real part of an inverse DFT: a dense update from 20 numbers, zero-mean-free in general
    assert ours.shape == (7, 12) and (ours != 0).float().mean() > 0.9


def test_fourier_only_bias_trains_and_saves_like_peft(tmp_path):
    family = FAMILY["llama"]
    kw = {"target_modules": ["down_proj"], "bias": "fourier_only"}
    ref_cfg, our_cfg = configs("llama", **kw)
    # llama has no biases; give the targeted layers some
    def with_bias():
        model = family.model()
        for layer in model.model.layers:
            lin = layer.mlp.down_proj
            lin.bias = torch.nn.Parameter(torch.zeros(lin.out_features))
        return model

    ours = peftkit.get_peft_model(with_bias(), our_cfg)
    theirs = peft.get_peft_model(with_bias(), ref_cfg)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    ours.save_pretrained(tmp_path / "a")
    theirs.save_pretrained(tmp_path / "b")
    a = load_file(tmp_path / "a" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b)
    assert sum(k.endswith("base_layer.bias") for k in a) == 2


def test_param_count_closed_form_uses_the_pattern():
    family = FAMILY["llama"]
    cfg = FourierFTConfig(n_frequency=8, n_frequency_pattern={"v_proj": 20}, target_modules=["q_proj", "v_proj"])
    model = peftkit.get_peft_model(family.model(), cfg)
    counts = {p.split(".")[-1]: FourierFTAdapter.param_count(layer.base_layer, cfg, p)
              for p, layer in model.base_model.adapter_layers()}
    assert counts == {"q_proj": 8, "v_proj": 20}
    assert model.get_nb_trainable_parameters()[0] == 2 * (8 + 20)
