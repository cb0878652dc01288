"""Compacter / Compacter++ (PHM adapters) and AdaptFormer: counts, the Kronecker formula, sharing, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peftkit import PeftModel, get_peft_model
from peftkit.methods.adapters.adaptformer import AdaptFormerConfig
from peftkit.methods.adapters.compacter import CompacterConfig, CompacterPlusPlusConfig, phm_weight
from peftkit.targeting import TargetError

from ..families import FAMILY, nudge_trainable


@pytest.fixture(scope="module")
def roberta_base():
    from transformers import RobertaConfig, RobertaModel

    torch.manual_seed(0)
    return RobertaModel(RobertaConfig())


@pytest.mark.parametrize("config, expected", [
    # d = 768, m = 768 / 32 = 24: 3 (d + m) = 2376 per adapter, + n^3 = 64 shared (AdapterHub 1.3.0: 57,088
    # and 28,576 with CompacterConfig() / CompacterPlusPlusConfig() on the same RoBERTa-base config)
    (CompacterConfig(), 24 * 2376 + 64),
    (CompacterPlusPlusConfig(), 12 * 2376 + 64),
    (AdaptFormerConfig(), 12 * (2 * 768 * 64 + 64 + 768)),
])
def test_roberta_base_parameter_counts(roberta_base, config, expected):
    model = get_peft_model(roberta_base, config)
    try:
        assert model.get_nb_trainable_parameters()[0] == expected
    finally:
        model.unload()


def test_phm_weight_is_a_sum_of_kronecker_products():
    torch.manual_seed(0)
    n = 4
    rule, s, t = torch.randn(n, n, n), torch.randn(n, 3), torch.randn(n, 5)
    expected = sum(torch.kron(rule[i], torch.outer(s[i], t[i])) for i in range(n))
    torch.testing.assert_close(phm_weight(rule, s, t), expected, atol=1e-6, rtol=1e-6)


def test_rules_are_shared_and_trained_once():
    family = FAMILY["gpt2"]
    model = get_peft_model(family.model(), CompacterConfig(reduction_factor=4.0))
    adapters = [a for _, a in model.base_model.adapters("default")]
    assert len(adapters) == 4
    owner = adapters[0]
    assert model.peft_config["default"].shared_owner == "transformer.h.0.attn.c_proj"
    assert all(a.rules[0] is owner.phm_rule for a in adapters)
    assert not any(hasattr(a, "phm_rule") for a in adapters[1:])  # one registered copy
    family.run(model).pow(2).mean().backward()
    # every layer's loss reaches the one rule tensor; each layer's own factors get their own gradient
    assert owner.phm_rule.grad is not None and owner.phm_rule.grad.abs().sum() > 0
    d, m = 32, 8
    assert model.get_nb_trainable_parameters()[0] == 4 * 3 * (d + m) + 4 ** 3


def test_compacter_formula_and_zero_init():
    family = FAMILY["llama"]
    base = family.run(family.model())
    model = get_peft_model(family.model(), CompacterPlusPlusConfig(reduction_factor=4.0, init_weights="lora")).eval()
    torch.testing.assert_close(family.run(model), base, atol=0, rtol=0)
    layer = model.get_base_model().model.layers[0].mlp.down_proj
    a = layer.adapters["default"]
    with torch.no_grad():
        a.up_s.normal_()
        h = torch.randn(3, 32)
        w_down = phm_weight(a.rules[0], a.down_s, a.down_t)
        w_up = phm_weight(a.rules[0], a.up_s, a.up_t)
        z = F.linear(F.gelu(F.linear(h, w_down, a.down_bias)), w_up, a.up_bias)
        torch.testing.assert_close(a(layer.base_layer, None, h), h + z, atol=1e-6, rtol=1e-5)
    assert w_down.shape == (8, 32) and w_up.shape == (32, 8)


def test_save_load_round_trip_exact(tmp_path):
    family = FAMILY["bert"]
    model = get_peft_model(family.model(), CompacterConfig(reduction_factor=4.0)).eval()
    nudge_trainable(model, 0.05)
    with torch.no_grad():
        expected = family.run(model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(family.model(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(family.run(loaded), expected, atol=0, rtol=0)


def test_phm_dim_must_divide_the_widths():
    model = FAMILY["bert"].model()
    with pytest.raises(TargetError, match="phm_dim: n = 4 must divide"):
        get_peft_model(model, CompacterConfig(reduction_factor=32.0))  # m = 32 / 32 = 1
    assert not any(type(m).__name__ == "AdapterLayer" for m in model.modules())


def test_adaptformer_is_a_scaled_parallel_mlp_branch():
    family = FAMILY["vit"]
    base = family.run(family.model())
    model = get_peft_model(family.model(), AdaptFormerConfig(bottleneck_size=4)).eval()
    torch.testing.assert_close(family.run(model), base, atol=0, rtol=0)
    mlp = model.get_base_model().vit.layers[0].mlp
    a = mlp.adapters["default"]
    with torch.no_grad():
        a.up_weight.normal_()
        x = torch.randn(2, 5, 32)
        z = F.linear(F.relu(F.linear(x, a.down_weight, a.down_bias)), a.up_weight, a.up_bias)
        torch.testing.assert_close(mlp(x), mlp.base_layer(x) + 0.1 * z, atol=1e-6, rtol=1e-5)
