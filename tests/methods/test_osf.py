"""OSF: config compatibility with Hugging Face PEFT, the SVD split and the delta, projected gradients (one
training step gives peft's weights), and bad input."""

from __future__ import annotations


import peft
import pytest
import torch
from torch import nn

import peftkit
from peftkit.config import ConfigError
from peftkit.methods.osf import OSFAdapter, OSFConfig
from peftkit.methods.osf.functional import osf_apply, osf_delta, resolve_rank, split_svd

from ..families import FAMILY
from ..parity import perturb
from ..parity import field_defaults


def test_config_fields_and_defaults_match_peft(tmp_path):
    assert field_defaults(OSFConfig) == field_defaults(peft.OSFConfig)
    peft.OSFConfig(effective_rank=0.25, rank_pattern={"k_proj": 3}).save_pretrained(tmp_path / "a")
    loaded = peftkit.PeftConfig.from_pretrained(tmp_path / "a")
    assert isinstance(loaded, OSFConfig) and loaded.effective_rank == 0.25 and loaded.rank_pattern == {"k_proj": 3}
    OSFConfig(effective_rank=5, init_weights=False).save_pretrained(tmp_path / "b")
    back = peft.PeftConfig.from_pretrained(tmp_path / "b")
    assert isinstance(back, peft.OSFConfig) and back.effective_rank == 5 and back.init_weights is False


@pytest.mark.parametrize("bad", [{"effective_rank": 0}, {"effective_rank": -0.5}, {"effective_rank": "half"},
                                 {"effective_rank": True}, {"rank_pattern": {"q": 0}}, {"rank_pattern": ["q"]},
                                 {"init_weights": "svd"}])
def test_bad_config_values(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        OSFConfig(**bad)


def test_rank_resolution_is_peft_s():
    assert [resolve_rank(v, 12) for v in (None, 0.25, 1.0, 5, 2.7, 40)] == [6, 3, 12, 5, 2, 12]


@pytest.mark.parametrize("shape", [(7, 12), (12, 7), (9, 9)])
def test_svd_split_delta_and_both_forward_paths(shape):
    torch.manual_seed(0)
    base = nn.Linear(shape[1], shape[0])
    ad = OSFAdapter(base, OSFConfig(effective_rank=3))
    r = min(shape) - 3
    assert (ad.U_low.shape, ad.S_low.shape, ad.V_low.shape) == ((shape[0], r), (r,), (r, shape[1]))
    assert OSFAdapter.param_count(base, OSFConfig(effective_rank=3)) == r * (sum(shape) + 1) == sum(
        p.numel() for p in ad.parameters())
    parts = split_svd(base.weight, 3, torch.float32)
    w = base.weight.detach()
    # the split reconstructs W; the adapted weight is W_high + U S V
    high = parts["U_high"] @ torch.diag(torch.linalg.svdvals(w)[:3]) @ parts["V_high"]
    torch.testing.assert_close(high + (parts["U_low"] * parts["S_low"]) @ parts["V_low"], w, atol=1e-5, rtol=0)
    with torch.no_grad():
        for p in ad.parameters():
            p.add_(0.3 * torch.randn_like(p))
    u, s, v = ad.U_low, ad.S_low, ad.V_low
    delta = osf_delta(u, s, v, ad.U_low_init, ad.S_low_init, ad.V_low_init)
    torch.testing.assert_close(w + delta, high + u @ torch.diag(s) @ v, atol=1e-5, rtol=0)
    x = torch.randn(3, shape[1])
    torch.testing.assert_close(osf_apply(x, u, s, v, ad.U_low_init, ad.S_low_init, ad.V_low_init), x @ delta.t(),
                               atol=1e-5, rtol=0)
    # many tokens: one GEMM with W + dW (fused); few: the rank-2r product -- same output and (projected) gradients
    x = torch.randn(64, shape[1])
    assert ad.fused_forward(base, x[:1]) is None
    grads = []
    for run in (lambda: ad.fused_forward(base, x), lambda: base(x) + osf_apply(x, *ad._factors())):
        y = run()
        torch.testing.assert_close(y, base(x) + x @ delta.t(), atol=1e-5, rtol=0)
        y.pow(2).sum().backward()
        grads.append([p.grad.clone() for p in ad.parameters()])
        ad.zero_grad()
    for g_fused, g_low in zip(*grads):
        assert g_fused.abs().sum() > 0
        torch.testing.assert_close(g_fused, g_low, atol=1e-4, rtol=1e-4)


def test_one_training_step_gives_peft_s_weights_and_keeps_the_frozen_subspace():
    """Seeded tiny Llama (all seven projections, square and non-square factors), random factors loaded into both:
    one SGD step updates U, S, V as peft's gradient hooks do, and dU, dV stay orthogonal to U_high, V_high."""
    family = FAMILY["llama"]
    theirs = peft.get_peft_model(family.model(), peft.OSFConfig(effective_rank=0.5))
    ours = peftkit.get_peft_model(family.model(), OSFConfig(effective_rank=0.5))
    perturb(theirs, only="osf_svd_params")
    peftkit.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    for model in (theirs, ours):
        model.train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        family.run(model).float().pow(2).mean().backward()
        if model is ours:  # the gradients avoid each layer's top-k singular subspace (unprojected ones would not)
            for path, layer in ours.base_model.adapter_layers():
                a = layer.adapters["default"]
                parts = split_svd(layer.base_layer.weight, a.k, torch.float32)
                du, dv = a.U_low.grad, a.V_low.grad
                assert du.norm() > 1e-6 and dv.norm() > 1e-6, path
                assert (parts["U_high"].t() @ du).norm() < 1e-4 * du.norm(), path
                assert (dv @ parts["V_high"].t()).norm() < 1e-4 * dv.norm(), path
        opt.step()
    ref, mine = peft.get_peft_model_state_dict(theirs), peftkit.get_peft_model_state_dict(ours)
    assert ref.keys() == mine.keys() and len(mine) == 42
    for key in ref:
        torch.testing.assert_close(mine[key], ref[key], atol=1e-5, rtol=0, msg=key)


def test_conv1d_is_laid_out_as_the_equivalent_linear():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(6, 10)  # weight (10, 6): d_in 10, d_out 6
    lin = nn.Linear(10, 6)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
    cfg = OSFConfig(effective_rank=2, init_weights=False)
    torch.manual_seed(1)
    ours = OSFAdapter(conv, cfg)
    torch.manual_seed(1)
    ref = OSFAdapter(lin, cfg)
    assert ours.U_low.shape == ref.U_low.shape == (6, 4)
    torch.testing.assert_close(ours.delta_weight(conv), ref.delta_weight(lin).t())


def test_unsupported_layer_or_rank_is_refused_model_untouched():
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv2d(4, 4, 1), nn.Linear(4, 20))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises((TypeError, ValueError), match="Conv2d"):
        peftkit.get_peft_model(model, OSFConfig(target_modules=["0", "1"]))
    # 0.1 of min(20, 4) = 4 is no whole direction: refused naming the module and the field
    with pytest.raises(ValueError, match=r"2: OSFConfig.rank_pattern .*\[1, 4\]"):
        peftkit.get_peft_model(model, OSFConfig(target_modules=["0", "2"], rank_pattern={"2": 0.1}))
    assert not any(isinstance(m, peftkit.AdapterLayer) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
