"""HRA: config compatibility with Hugging Face PEFT, the Householder math, and layers it cannot adapt."""

from __future__ import annotations

import dataclasses
import json
import warnings

import peft
import pytest
import torch
from torch import nn

import peftkit
from peftkit import AdapterLayer
from peftkit.config import ConfigError
from peftkit.methods.hra import HRAAdapter, HRAConfig
from peftkit.methods.hra.functional import householder_product

from ..families import FAMILY


def test_config_fields_and_defaults_match_peft(tmp_path):
    ours = {f.name: f.default for f in dataclasses.fields(HRAConfig) if f.default is not dataclasses.MISSING}
    theirs = {f.name: f.default for f in dataclasses.fields(peft.HRAConfig) if f.default is not dataclasses.MISSING}
    assert ours == theirs
    peft.HRAConfig(r=6, apply_GS=True, target_modules=["q_proj"]).save_pretrained(tmp_path / "a")
    loaded = peftkit.PeftConfig.from_pretrained(tmp_path / "a")
    assert isinstance(loaded, HRAConfig) and loaded.r == 6 and loaded.apply_GS and loaded.target_modules == {"q_proj"}
    HRAConfig(r=2, bias="hra_only").save_pretrained(tmp_path / "b")
    back = peft.PeftConfig.from_pretrained(tmp_path / "b")
    assert isinstance(back, peft.HRAConfig) and back.r == 2 and back.bias == "hra_only"
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["peft_type"] == "HRA"


@pytest.mark.parametrize("bad", [{"r": 0}, {"bias": "lora_only"}, {"apply_GS": 1}])
def test_bad_config_values(bad):
    with pytest.raises(ConfigError):
        HRAConfig(**bad)


@pytest.mark.parametrize("gs", [False, True])
def test_householder_chain_is_orthogonal_and_reverse_inverts(gs):
    torch.manual_seed(0)
    u = torch.randn(10, 3, dtype=torch.float64)
    h, back = householder_product(u, gs), householder_product(u, gs, reverse=True)
    torch.testing.assert_close(h @ h.t(), torch.eye(10, dtype=torch.float64))
    torch.testing.assert_close(h @ back, torch.eye(10, dtype=torch.float64))
    if not gs:
        expected = torch.eye(10, dtype=torch.float64)
        for i in range(3):
            v = u[:, i] / u[:, i].norm()
            expected = expected @ (torch.eye(10, dtype=torch.float64) - 2 * torch.outer(v, v))
        torch.testing.assert_close(h, expected)


def test_even_rank_starts_at_identity_odd_rank_warns():
    base = nn.Linear(8, 5)
    assert torch.allclose(HRAAdapter(base, HRAConfig(r=4)).householder(), torch.eye(8), atol=1e-6)
    with pytest.warns(UserWarning, match="even r"):
        HRAAdapter(base, HRAConfig(r=3), "lin")


def _unchanged(model, before):
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_gram_schmidt_rank_above_fan_in_is_refused_model_untouched():
    model = FAMILY["llama"].model()  # q_proj / v_proj: fan-in 32
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"q_proj: HRAConfig.r=40 with apply_GS=True.*r <= 32"):
        peftkit.get_peft_model(model, HRAConfig(r=40, apply_GS=True))
    _unchanged(model, before)


def test_grouped_convolution_is_refused_model_untouched():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 2, 1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"0: HRA does not wrap grouped convolutions \(groups=2\)"):
        peftkit.get_peft_model(model, HRAConfig(r=2, target_modules=["0", "1"]))
    _unchanged(model, before)


def test_conv2d_matches_peft():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 1))
    cfg = dict(r=3, init_weights=False, target_modules=["0", "2"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(1)
        theirs = peft.get_peft_model(_copy(model), peft.HRAConfig(**cfg))
        ours = peftkit.get_peft_model(_copy(model), HRAConfig(**cfg))
    peftkit.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    x = torch.randn(2, 3, 7, 7)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=0)
    ours.merge_adapter()
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=0)


def _copy(model):
    import copy

    return copy.deepcopy(model)
