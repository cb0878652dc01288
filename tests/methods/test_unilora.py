"""Uni-LoRA: config as PEFT's, the balanced assignment, the one trained vector, saved indices."""

from __future__ import annotations

import dataclasses

import peft
import pytest
import torch
from safetensors.torch import load_file

import peftkit
from peftkit.config import ConfigError
from peftkit.methods.unilora import UniLoraConfig
from peftkit.methods.unilora import functional as UF

from ..families import FAMILY


def test_config_fields_and_defaults_match_peft(tmp_path):
    assert {f.name for f in dataclasses.fields(UniLoraConfig)} == {f.name for f in dataclasses.fields(peft.UniLoraConfig)}
    a, b = UniLoraConfig(), peft.UniLoraConfig()
    for f in dataclasses.fields(UniLoraConfig):
        if f.name not in ("peft_type", "peft_version"):
            assert getattr(a, f.name) == getattr(b, f.name), f.name
    UniLoraConfig(r=3, theta_d_length=40, save_indices=True).save_pretrained(tmp_path)
    ref = peft.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(ref, peft.UniLoraConfig) and (ref.r, ref.theta_d_length, ref.save_indices) == (3, 40, True)
    assert isinstance(peftkit.PeftConfig.from_pretrained(tmp_path), UniLoraConfig)


@pytest.mark.parametrize(("kwargs", "field"), [({"r": 0}, "r"), ({"theta_d_length": 0}, "theta_d_length"),
                                               ({"init_theta_d_bound": 0.0}, "init_theta_d_bound"),
                                               ({"bias": "lora_only"}, "bias"), ({"unilora_dropout": 1.0}, "unilora_dropout")])
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=rf"UniLoraConfig\.{field}: expected"):
        UniLoraConfig(**kwargs)


def test_assignment_is_balanced_and_normalised():
    index = UF.balanced_index(103, 10, 3)
    counts = torch.bincount(index, minlength=10)
    assert index.shape == (103,) and set(counts.tolist()) == {10, 11} and counts.sum() == 103
    inv = UF.inverse_sqrt_counts(index, 10)
    # each column of the projection P (entries inv[i] where index == i) has unit norm: P is an isometry
    torch.testing.assert_close((inv[index] ** 2).new_zeros(10).index_add_(0, index, inv[index] ** 2), torch.ones(10))
    assert torch.equal(index, peft.tuners.unilora.UniLoraModel.generate_index(103, 10, 3))


def test_one_trained_vector_and_the_delta():
    model = peftkit.get_peft_model(FAMILY["gpt2"].model(), UniLoraConfig(r=2, theta_d_length=32))
    theta = model.base_model.shared_state["default"].unilora_theta_d
    assert model.get_nb_trainable_parameters()[0] == 32
    path, layer = model.base_model.adapter_layers()[0]
    ad = layer.adapters["default"]
    a = theta[ad.unilora_indices_A] * ad.unilora_scales_A
    b = theta[ad.unilora_indices_B] * ad.unilora_scales_B
    torch.testing.assert_close(ad.delta_weight(layer.base_layer), (b @ a).t())  # Conv1D stores (d_in, d_out)
    FAMILY["gpt2"].run(model).pow(2).mean().backward()
    assert theta.grad is not None and theta.grad.abs().sum() > 0


def test_saved_indices_are_used_on_load(tmp_path):
    family = FAMILY["llama"]
    model = peftkit.get_peft_model(family.model(), UniLoraConfig(r=2, theta_d_length=32, save_indices=True))
    expected = family.run(model)
    model.save_pretrained(tmp_path)
    assert any(k.endswith(".unilora_indices_A") for k in load_file(tmp_path / "adapter_model.safetensors"))
    loaded = peftkit.PeftModel.from_pretrained(family.model(), tmp_path, config=UniLoraConfig(
        r=2, theta_d_length=32, save_indices=True, proj_seed=999))  # another seed: the file's indices win
    torch.testing.assert_close(family.run(loaded), expected, atol=0, rtol=0)
