"""(IA)3: config validation, the scaling math, and compatibility with Hugging Face PEFT."""

from __future__ import annotations

import dataclasses

import peft
import pytest
import torch
from torch import nn

import peftkit
from peftkit.config import ConfigError
from peftkit.methods.ia3 import IA3Adapter, IA3Config

from ..families import FAMILY


def test_config_fields_and_defaults_match_peft():
    ours = {f.name for f in dataclasses.fields(IA3Config)}
    theirs = {f.name for f in dataclasses.fields(peft.IA3Config)}
    assert ours == theirs
    a, b = IA3Config(), peft.IA3Config()
    for name in theirs - {"peft_type", "peft_version"}:
        assert getattr(a, name) == getattr(b, name), name
    assert a.peft_type == "IA3" and a.init_ia3_weights is True


@pytest.mark.parametrize(
    ("kwargs", "field", "match"),
    [
        ({"target_modules": ["k", "v"], "feedforward_modules": ["wo"]}, "feedforward_modules", r"\['wo'\] are not"),
        ({"init_ia3_weights": "yes"}, "init_ia3_weights", "True or False"),
        ({"feedforward_modules": 3}, "feedforward_modules", "list of names"),
    ],
)
def test_config_validation_names_the_field(kwargs, field, match):
    with pytest.raises(ConfigError, match=f"IA3Config.{field}: .*{match}"):
        IA3Config(**kwargs)
    if field == "feedforward_modules" and isinstance(kwargs[field], list):
        with pytest.raises(ValueError, match="subset"):  # PEFT rejects the same config
            peft.IA3Config(**kwargs)


def test_subset_rule_only_applies_to_lists():
    cfg = IA3Config(target_modules=".*(k|v|wo)", feedforward_modules=["wo"])
    assert cfg.feedforward_modules == {"wo"}  # name lists become sets, as in peft
    assert IA3Config(target_modules=["k", "wo"], feedforward_modules={"wo"}).target_modules == {"k", "wo"}


def _layers():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv1d = Conv1D(5, 6)
    nn.init.normal_(conv1d.bias)
    return [
        (nn.Linear(6, 5), torch.randn(3, 4, 6)),
        (conv1d, torch.randn(3, 4, 6)),
        (nn.Conv2d(6, 4, 3, padding=1), torch.randn(2, 6, 5, 5)),
        (nn.Conv2d(6, 4, 3, groups=2), torch.randn(2, 6, 5, 5)),
    ]


@pytest.mark.parametrize("feedforward", [False, True])
def test_forward_and_merge_math(feedforward):
    for base, x in _layers():
        cfg = IA3Config(target_modules=["m"], feedforward_modules=["m"] if feedforward else [])
        adapter = IA3Adapter(base, cfg, "m")
        with torch.no_grad():
            adapter.ia3_l.copy_(torch.rand(adapter.ia3_l.shape) + 0.5)
        l = adapter.ia3_l
        ref = base(x * l.reshape(-1) if not isinstance(base, nn.Conv2d) else x * l) if feedforward else (
            base(x) * (l.reshape(-1) if not isinstance(base, nn.Conv2d) else l))
        fused = adapter.fused_forward(base, x)
        assert (fused is None) == (not feedforward)
        # the generic path (several adapters, mixed batches) agrees with PEFT's computation
        torch.testing.assert_close(adapter(base, x, base(x)), ref, atol=1e-5, rtol=1e-5)
        if fused is not None:
            torch.testing.assert_close(fused, ref, atol=0, rtol=0)
        merged = type(base).__new__(type(base))
        merged.__dict__ = {**base.__dict__, "_parameters": dict(base._parameters)}
        w, _ = adapter.merge(base, base.weight.detach())
        merged._parameters["weight"] = nn.Parameter(w)
        if not feedforward and base.bias is not None:
            merged._parameters["bias"] = nn.Parameter(adapter.merge_param(base, "bias", base.bias.detach()))
        torch.testing.assert_close(merged(x), ref, atol=1e-5, rtol=1e-5)


def test_zero_entries_still_unmerge_exactly():
    family = FAMILY["bert"]
    model = peftkit.get_peft_model(family.model(), IA3Config(task_type="SEQ_CLS"))
    with torch.no_grad():
        for _, layer in model.base_model.adapter_layers():
            layer.adapters["default"].ia3_l.view(-1)[::3] = 0.0
    before = {k: v.clone() for k, v in model.get_base_model().state_dict().items()}
    model.merge_adapter()
    model.unmerge_adapter()
    after = model.get_base_model().state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
