"""DeLoRA: config compatibility with Hugging Face PEFT, the normalised delta, and bad input."""

from __future__ import annotations


import peft
import pytest
import torch
from torch import nn

import peftkit
from peftkit.config import ConfigError
from peftkit.methods.delora import DeloraAdapter, DeloraConfig
from peftkit.methods.delora.functional import delora_apply, delora_delta
from ..parity import field_defaults
from tests.families import untouched


def test_config_fields_and_defaults_match_peft(tmp_path):
    assert field_defaults(DeloraConfig) == field_defaults(peft.DeloraConfig)
    peft.DeloraConfig(r=3, delora_lambda=7, lambda_pattern={"q": 2}, rank_pattern={"v": 1}).save_pretrained(tmp_path / "a")
    loaded = peftkit.PeftConfig.from_pretrained(tmp_path / "a")
    assert isinstance(loaded, DeloraConfig) and (loaded.r, loaded.delora_lambda) == (3, 7)
    assert loaded.lambda_pattern == {"q": 2} and loaded.rank_pattern == {"v": 1}
    DeloraConfig(r=2, module_dropout=0.1, bias="delora_only").save_pretrained(tmp_path / "b")
    back = peft.PeftConfig.from_pretrained(tmp_path / "b")
    assert isinstance(back, peft.DeloraConfig) and back.module_dropout == 0.1 and back.bias == "delora_only"


@pytest.mark.parametrize("bad", [{"r": 0}, {"module_dropout": 1.0}, {"bias": "lora_only"}, {"rank_pattern": {"q": 0}},
                                 {"lambda_pattern": {"q": "x"}}])
def test_bad_config_values(bad):
    with pytest.raises(ConfigError):
        DeloraConfig(**bad)


def test_delta_bounded_by_lambda_and_factored_forward_agrees():
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    ad = DeloraAdapter(base, DeloraConfig(r=3, delora_lambda=2, init_weights=False))
    a, b, lam, w_norm = ad.delora_A, ad.delora_B, ad.delora_lambda, ad.delora_w_norm
    torch.testing.assert_close(w_norm, base.weight.norm(dim=0))
    delta = delora_delta(a, b, lam, 3, w_norm)
    # each normalised rank-one term has unit Frobenius norm: ||dW diag(1/w_norm)||_F <= lambda
    assert (delta / w_norm).norm() <= 2 + 1e-5
    x = torch.randn(5, 12)
    torch.testing.assert_close(delora_apply(x, a, b, lam, 3, w_norm), x @ delta.t(), atol=1e-5, rtol=1e-5)


def test_conv1d_delta_in_base_layout():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(6, 10)  # weight (10, 6): d_in 10, d_out 6
    lin = nn.Linear(10, 6)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
    cfg = DeloraConfig(r=2, init_weights=False)
    torch.manual_seed(1)
    ours = DeloraAdapter(conv, cfg)
    torch.manual_seed(1)
    ref = DeloraAdapter(lin, cfg)
    torch.testing.assert_close(ours.delta_weight(conv), ref.delta_weight(lin).t())


def test_unsupported_layer_is_refused_model_untouched():
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv2d(4, 4, 1))
    with untouched(model), pytest.raises((TypeError, ValueError)):
        peftkit.get_peft_model(model, DeloraConfig(r=2, target_modules=["0", "1"]))
