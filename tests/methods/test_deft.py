"""DeFT: config compatibility with Hugging Face PEFT, the projection + injection update, and bad input."""

from __future__ import annotations


import peft
import pytest
import torch
from torch import nn

import peftkit
from peftkit.config import ConfigError
from peftkit.methods.deft import DeftAdapter, DeftConfig
from peftkit.methods.deft.functional import deft_apply, deft_delta, project, removal_factor
from ..parity import field_defaults
from tests.families import untouched


def test_config_fields_and_defaults_match_peft(tmp_path):
    assert field_defaults(DeftConfig) == field_defaults(peft.DeftConfig)
    peft.DeftConfig(r=3, decomposition_method="qr", alpha=6, para=True, bias="deft_only").save_pretrained(tmp_path / "a")
    loaded = peftkit.PeftConfig.from_pretrained(tmp_path / "a")
    assert isinstance(loaded, DeftConfig)
    assert (loaded.r, loaded.decomposition_method, loaded.alpha, loaded.para, loaded.bias) == (3, "qr", 6, True, "deft_only")
    DeftConfig(r=5, init_scale=0.5, deft_dropout=0.1, init_weights=False).save_pretrained(tmp_path / "b")
    back = peft.PeftConfig.from_pretrained(tmp_path / "b")
    assert isinstance(back, peft.DeftConfig)
    assert (back.r, back.init_scale, back.deft_dropout, back.init_weights) == (5, 0.5, 0.1, False)


@pytest.mark.parametrize("bad", [{"r": 0}, {"decomposition_method": "svd"}, {"deft_dropout": 1.0}, {"bias": "lora_only"},
                                 {"alpha": "x"}, {"para": 1}, {"init_scale": None},
                                 {"target_modules": ".*q", "layers_to_transform": [0]},
                                 {"layers_pattern": "layers"}])
def test_bad_config_values(bad):
    field = [k for k in bad if k != "target_modules"][0]
    with pytest.raises(ConfigError, match=field):
        DeftConfig(**bad)


@pytest.mark.parametrize(("method", "para", "alpha"), [("relu", False, None), ("qr", False, 6), ("qr", True, None)])
def test_update_matches_direct_formula_and_peft(method, para, alpha):
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    cfg = DeftConfig(r=3, decomposition_method=method, para=para, alpha=alpha, init_weights=False)
    ad = DeftAdapter(base, cfg)
    w, p = base.weight, ad.deft_P
    q = torch.linalg.qr(p)[0] if method == "qr" else p
    proj = q @ (q if method == "qr" else torch.relu(p)).t()  # the d_out x d_out projector
    adapted = (torch.eye(7) - proj) @ w
    if not para:
        adapted = adapted + q @ ad.deft_R * (alpha / 3 if alpha else 1.0)
    delta = ad.delta_weight(base)
    assert delta.abs().max() > 1e-4
    torch.testing.assert_close(w + delta, adapted, atol=1e-6, rtol=1e-5)
    x = torch.randn(2, 5, 12)
    out = base(x)
    torch.testing.assert_close(ad(base, x, out.clone()), x @ adapted.t() + base.bias, atol=1e-5, rtol=1e-5)
    # peft's layer with the same tensors: the same update and outputs
    ref = peft.tuners.deft.layer.DeftLinear(nn.Linear(12, 7), "default", config=peft.DeftConfig(
        r=3, decomposition_method=method, para=para, alpha=alpha, init_weights=False), r=3)
    with torch.no_grad():
        ref.base_layer.load_state_dict(base.state_dict())
        ref.deft_P["default"].copy_(p)
        if not para:
            ref.deft_R["default"].copy_(ad.deft_R)
    torch.testing.assert_close(delta, ref.get_delta_weight("default"), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ad(base, x, base(x)), ref(x), atol=1e-5, rtol=1e-5)


def test_identity_init_rank_cap_and_closed_form_count():
    torch.manual_seed(0)
    base = nn.Linear(10, 6)
    ad = DeftAdapter(base, DeftConfig(r=4, alpha=8))
    torch.testing.assert_close(ad.delta_weight(base), torch.zeros(6, 10), atol=1e-7, rtol=0)
    assert sum(p.numel() for p in ad.parameters()) == DeftAdapter.param_count(base, DeftConfig(r=4)) == 4 * 16
    narrow = nn.Linear(10, 2)  # r capped at d_out = 2
    cap = DeftAdapter(narrow, DeftConfig(r=8, para=True, decomposition_method="qr"))
    assert cap.deft_P.shape == (2, 2) and not hasattr(cap, "deft_R") and cap.checkpoint_keys == {"deft_P": "deft_P"}
    assert DeftAdapter.param_count(narrow, DeftConfig(r=8, para=True)) == 4


def test_factored_forward_equals_dense():
    torch.manual_seed(0)
    w, p, r = torch.randn(7, 12), torch.randn(7, 3), torch.randn(3, 12)
    q, right = project(p, "relu")
    m = removal_factor(right, w)
    x = torch.randn(4, 12)
    torch.testing.assert_close(deft_apply(x, x, q, m, r), x @ deft_delta(q, m, r).t(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(deft_apply(x, x, q, m, None), -(x @ w.t()) @ right @ q.t(), atol=1e-5, rtol=1e-5)


def test_conv1d_delta_in_base_layout():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(6, 10)  # weight (10, 6): d_in 10, d_out 6
    lin = nn.Linear(10, 6)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
    cfg = DeftConfig(r=2, decomposition_method="qr", init_weights=False)
    torch.manual_seed(1)
    ours = DeftAdapter(conv, cfg)
    torch.manual_seed(1)
    ref = DeftAdapter(lin, cfg)
    assert ours.deft_P.shape == (6, 2) and ours.deft_R.shape == (2, 10)
    torch.testing.assert_close(ours.delta_weight(conv), ref.delta_weight(lin).t())


def test_unsupported_layer_is_refused_model_untouched():
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv2d(4, 4, 1))
    with untouched(model), pytest.raises(ValueError, match=r"'1' is a Conv2d; this method wraps Linear"):
        peftkit.get_peft_model(model, DeftConfig(r=2, target_modules=["0", "1"]))
