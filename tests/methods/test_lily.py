"""Lily beyond the parity table: config fields as peft's, the sharing plan, no merge."""

from __future__ import annotations

import dataclasses

import peft
import pytest

import peftkit
from peftkit import ConfigError

from ..families import FAMILY


def test_fields_and_defaults_are_peft_s():
    ours = {f.name: f.default for f in dataclasses.fields(peftkit.LilyConfig)}
    theirs = {f.name: f.default for f in dataclasses.fields(peft.LilyConfig)}
    assert {k: v for k, v in theirs.items() if k in ours} == {k: ours[k] for k in theirs if k in ours}
    assert set(theirs) - set(ours) <= {"runtime_config"}


@pytest.mark.parametrize(("field", "value"), [("num_B", 1), ("stride_A", 0), ("r", 0)])
def test_bad_sizes_are_refused(field, value):
    with pytest.raises(ConfigError, match=f"LilyConfig.{field}"):
        peftkit.LilyConfig(**{field: value})


def test_shared_tensors_are_one_parameter():
    cfg = peftkit.LilyConfig(r=2, stride_A=2, target_modules=["q_proj", "v_proj"])
    model = peftkit.get_peft_model(FAMILY["llama"].model(), cfg)
    layers = {p.split(".")[-1] + p.split(".")[2]: l.adapters["default"] for p, l in model.base_model.adapter_layers()}
    assert layers["q_proj0"].lily_A is layers["q_proj1"].lily_A  # one stride run of 2
    assert layers["q_proj0"].lily_B is layers["q_proj1"].lily_B  # the group's experts
    assert layers["q_proj0"].lily_B is not layers["v_proj0"].lily_B  # other suffix, other group
    assert layers["q_proj0"].lily_router is not layers["q_proj1"].lily_router
    model.train()
    FAMILY["llama"].run(model).pow(2).mean().backward()
    assert layers["q_proj0"].lily_B.grad is not None


def test_merge_is_refused():
    model = peftkit.get_peft_model(FAMILY["llama"].model(), peftkit.LilyConfig(r=2))
    with pytest.raises(Exception, match="(?i)merge"):
        model.merge_and_unload()
