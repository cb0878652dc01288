"""BEFT: config compatibility with Hugging Face PEFT, the value-bias forward, bias-free layers, targets, bad input."""

from __future__ import annotations

import dataclasses
import warnings

import peft
import pytest
import torch
from peft.utils import constants as peft_constants
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftkit
from peftkit.config import ConfigError
from peftkit.methods.beft import BeftAdapter, BeftConfig
from peftkit.targeting import NotApplicableError, default_target_names

from ..families import FAMILY, untouched
from ..parity import linearized, perturb


def _defaults(cls):
    return {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
            for f in dataclasses.fields(cls)}


def test_config_fields_and_defaults_match_peft(tmp_path):
    assert _defaults(BeftConfig) == _defaults(peft.BeftConfig)
    peft.BeftConfig(target_modules=["value"], init_weights=False).save_pretrained(tmp_path / "a")
    loaded = peftkit.PeftConfig.from_pretrained(tmp_path / "a")
    assert isinstance(loaded, BeftConfig) and loaded.init_weights is False and set(loaded.target_modules) == {"value"}
    BeftConfig(target_modules=["v_proj"], modules_to_save=["score"]).save_pretrained(tmp_path / "b")
    back = peft.PeftConfig.from_pretrained(tmp_path / "b")
    assert isinstance(back, peft.BeftConfig) and back.peft_type == peft.PeftType.BEFT and back.modules_to_save == ["score"]


@pytest.mark.parametrize("bad", [{"init_weights": "zeros"}, {"init_weights": 0}])
def test_bad_config_values(bad):
    with pytest.raises(ConfigError, match="init_weights"):
        BeftConfig(**bad)


def test_default_targets_are_peft_beft_table():
    table = peft_constants.TRANSFORMERS_MODELS_TO_BEFT_TARGET_MODULES_MAPPING
    assert len(table) >= 19
    for model_type, ref in table.items():
        assert sorted(default_target_names(model_type, "beft")) == sorted(ref), model_type


def test_bert_value_bias_only_and_exact_forward():
    family = FAMILY["bert"]
    model = peftkit.get_peft_model(family.model(), BeftConfig(task_type="SEQ_CLS"))
    layers = dict(model.base_model.adapter_layers())
    assert sorted(layers) == ["bert.encoder.layer.0.attention.self.value", "bert.encoder.layer.1.attention.self.value"]
    # 2 value projections x 32 outputs, plus the classifier head (32 x 3 + 3) trained in full
    assert model.get_nb_trainable_parameters()[0] == 2 * 32 + 99
    perturb(model)
    layer = layers["bert.encoder.layer.0.attention.self.value"]
    x = torch.randn(3, 5, 32)
    bias = layer.adapters["default"].beft_bias
    expected = nn.functional.linear(x, layer.base_layer.weight, layer.base_layer.bias) + bias
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=0)
    # the generic path (a hook on the base declines the fused GEMM) gives the same
    handle = layer.base_layer.register_forward_hook(lambda m, i, o: None)
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=0)
    handle.remove()
    keys = set(peftkit.get_peft_model_state_dict(model))
    assert "base_model.model.bert.encoder.layer.0.attention.self.value.beft_bias" in keys
    assert peftkit.get_peft_model_state_dict(model)[
        "base_model.model.bert.encoder.layer.0.attention.self.value.beft_bias"].shape == (1, 32)


def test_bias_free_layer_trains_and_merges_where_peft_refuses():
    """Llama's v_proj has no bias: both libraries add the (1, d_out) bias and warn; peft refuses to merge,
    peftkit adds a bias parameter on merge (removed again by unmerge)."""
    family = FAMILY["llama"]
    with pytest.warns(UserWarning, match="no bias"):
        ours = peftkit.get_peft_model(family.model(), BeftConfig())
    with pytest.warns(UserWarning, match="no bias"):
        theirs = peft.get_peft_model(family.model(), peft.BeftConfig())
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert ours.get_nb_trainable_parameters()[0] == 2 * 16  # two v_proj layers of 16 outputs
    perturb(ours)
    perturb(theirs)
    torch.testing.assert_close(family.run(ours), family.run(theirs), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="no bias"):
        theirs.merge_adapter()
    unmerged = family.run(ours)
    layer = dict(ours.base_model.adapter_layers())["model.layers.0.self_attn.v_proj"]
    with pytest.warns(UserWarning, match="adds a bias"):
        ours.merge_adapter()
    torch.testing.assert_close(layer.base_layer.bias, layer.adapters["default"].beft_bias.detach()[0])
    torch.testing.assert_close(family.run(ours), unmerged, atol=1e-6, rtol=0)
    ours.unmerge_adapter()
    assert layer.base_layer.bias is None and "bias" in layer.base_layer._parameters
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = ours.merge_and_unload()
    torch.testing.assert_close(family.run(plain), unmerged, atol=1e-6, rtol=0)


def test_gpt2_has_no_default_but_explicit_conv1d_targets_work():
    family = FAMILY["gpt2"]
    model = family.model()
    with pytest.raises(NotApplicableError, match="c_attn"):
        peftkit.get_peft_model(model, BeftConfig())
    assert not any(isinstance(m, peftkit.AdapterLayer) for m in model.modules())
    with pytest.raises(ValueError):  # peft has no GPT-2 default either
        peft.get_peft_model(family.model(), peft.BeftConfig())
    ours = peftkit.get_peft_model(family.model(), BeftConfig(target_modules=["c_attn"], init_weights=False))
    conv = ours.base_model.model.transformer.h[0].attn.c_attn
    assert isinstance(conv.base_layer, Conv1D) and conv.adapters["default"].beft_bias.shape == (1, 96)
    # the same bias on the equivalent nn.Linear (peft's side) gives the same outputs
    ref = peft.get_peft_model(linearized(family.model()), peft.BeftConfig(target_modules=["c_attn"]))
    with torch.no_grad():
        for i in range(2):
            ref.base_model.model.transformer.h[i].attn.c_attn.beft_bias["default"].copy_(
                ours.base_model.model.transformer.h[i].attn.c_attn.adapters["default"].beft_bias)
    torch.testing.assert_close(family.run(ours), family.run(ref), atol=1e-5, rtol=0)


def test_unsupported_layer_is_refused_model_untouched():
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv2d(4, 4, 1))
    with untouched(model), pytest.raises((TypeError, ValueError), match="Conv2d"):
        peftkit.get_peft_model(model, BeftConfig(target_modules=["0", "1"]))


def test_param_count_closed_form():
    assert BeftAdapter.param_count(nn.Linear(7, 5), BeftConfig()) == 5
    assert BeftAdapter.param_count(Conv1D(9, 4), BeftConfig()) == 9  # Conv1D(nf=9, nx=4): d_out 9
