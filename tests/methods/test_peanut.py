"""PEANuT: config compatibility with Hugging Face PEFT, the weight-conditioned delta, and bad input."""

from __future__ import annotations


import peft
import pytest
import torch
from torch import nn

import peftkit
from peftkit.config import ConfigError
from peftkit.methods.peanut import PeanutAdapter, PeanutConfig
from peftkit.methods.peanut.functional import peanut_apply, peanut_delta, tweak
from ..parity import field_defaults
from tests.families import untouched


def test_config_fields_and_defaults_match_peft(tmp_path):
    assert field_defaults(PeanutConfig) == field_defaults(peft.PeanutConfig)
    peft.PeanutConfig(r=3, depth=2, act_fn="gelu", scaling=0.5).save_pretrained(tmp_path / "a")
    loaded = peftkit.PeftConfig.from_pretrained(tmp_path / "a")
    assert isinstance(loaded, PeanutConfig)
    assert (loaded.r, loaded.depth, loaded.act_fn, loaded.scaling) == (3, 2, "gelu", 0.5)
    PeanutConfig(r=5, depth=1, init_weights=False, target_modules=["q_proj"]).save_pretrained(tmp_path / "b")
    back = peft.PeftConfig.from_pretrained(tmp_path / "b")
    assert isinstance(back, peft.PeanutConfig) and (back.r, back.depth, back.init_weights) == (5, 1, False)
    assert back.target_modules == {"q_proj"}


@pytest.mark.parametrize("bad", [{"r": 0}, {"depth": -1}, {"depth": 1.5}, {"act_fn": "swishy"}, {"scaling": "x"},
                                 {"init_weights": "yes"}, {"layers_pattern": "layers"}])
def test_bad_config_values(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        PeanutConfig(**bad)


def direct_delta(w: torch.Tensor, a, encs, decs, b, act, s) -> torch.Tensor:
    """The paper's dW, one input channel (a row of W^T) at a time, written without the library's functions."""
    rows = []
    for row in w.t():  # (d_out,)
        h = act(a @ row)
        stack = []
        for e in encs:
            stack.append(h)
            h = act(e @ h)
        for d in decs:
            h = act(d @ h) + stack.pop()
        rows.append(s * (b @ h))
    return torch.stack(rows, dim=1)  # (d_out, d_in)


@pytest.mark.parametrize(("depth", "act"), [(0, "relu"), (2, "gelu")])
def test_delta_and_factored_forward_match_direct_formula_and_peft(depth, act):
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    cfg = PeanutConfig(r=3, depth=depth, act_fn=act, scaling=0.7, init_weights=False)
    ad = PeanutAdapter(base, cfg)
    fn = {"relu": torch.relu, "gelu": nn.functional.gelu}[act]
    expected = direct_delta(base.weight, ad.peanut_A, ad.encoders, ad.decoders, ad.peanut_B, fn, 0.7)
    delta = ad.delta_weight(base)
    assert delta.shape == (7, 12) and delta.abs().max() > 1e-3
    torch.testing.assert_close(delta, expected, atol=1e-6, rtol=1e-5)
    x = torch.randn(2, 5, 12)
    out = base(x)
    torch.testing.assert_close(ad(base, x, out.clone()), out + x @ expected.t(), atol=1e-5, rtol=1e-5)
    h = tweak(base.weight.t(), ad.peanut_A, ad.encoders, ad.decoders, fn)
    torch.testing.assert_close(peanut_apply(x, h, ad.peanut_B, 0.7), x @ peanut_delta(h, ad.peanut_B, 0.7).t(),
                               atol=1e-5, rtol=1e-5)
    # peft's layer with the same tensors gives the same update
    ref = peft.tuners.peanut.layer.Linear(nn.Linear(12, 7), "default", r=3, config=peft.PeanutConfig(
        r=3, depth=depth, act_fn=act, scaling=0.7, init_weights=False))
    with torch.no_grad():
        ref.base_layer.load_state_dict(base.state_dict())
        ref.peanut_A["default"].weight.copy_(ad.peanut_A)
        ref.peanut_B["default"].weight.copy_(ad.peanut_B)
        for mine, theirs in zip(ad.encoders + ad.decoders,
                                [*ref.peanut_encoders["default"], *ref.peanut_decoders["default"]]):
            theirs.weight.copy_(mine)
    torch.testing.assert_close(delta, ref.get_delta_weight("default"), atol=1e-6, rtol=1e-5)


def test_starts_at_zero_and_counts_closed_form():
    base = nn.Linear(10, 6)
    ad = PeanutAdapter(base, PeanutConfig(r=4, depth=2))
    assert torch.equal(ad.delta_weight(base), torch.zeros(6, 10))
    n = sum(p.numel() for p in ad.parameters())
    assert n == PeanutAdapter.param_count(base, PeanutConfig(r=4, depth=2)) == 2 * 4 * 6 + 2 * 2 * 16 == 112
    assert sorted(ad.checkpoint_keys.values()) == [
        "peanut_A.weight", "peanut_B.weight", "peanut_decoders.0.weight", "peanut_decoders.1.weight",
        "peanut_encoders.0.weight", "peanut_encoders.1.weight"]


def test_conv1d_delta_in_base_layout():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(6, 10)  # weight (10, 6): d_in 10, d_out 6
    lin = nn.Linear(10, 6)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
    cfg = PeanutConfig(r=2, depth=1, init_weights=False)
    torch.manual_seed(1)
    ours = PeanutAdapter(conv, cfg)
    torch.manual_seed(1)
    ref = PeanutAdapter(lin, cfg)
    assert ours.peanut_A.shape == ref.peanut_A.shape == (2, 6)
    torch.testing.assert_close(ours.delta_weight(conv), ref.delta_weight(lin).t())


def test_unsupported_layer_is_refused_model_untouched():
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv2d(4, 4, 1))
    with untouched(model), pytest.raises(ValueError, match=r"'1' is a Conv2d; this method wraps Linear"):
        peftkit.get_peft_model(model, PeanutConfig(r=2, target_modules=["0", "1"]))
