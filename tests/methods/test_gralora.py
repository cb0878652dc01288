"""GraLoRA beyond the parity table: config fields as peft's, shapes it cannot split refused up front."""

from __future__ import annotations

import dataclasses

import peft
import pytest

import peftkit
from peftkit import ConfigError

from ..families import FAMILY, untouched


def test_fields_and_defaults_are_peft_s():
    ours = {f.name: f.default for f in dataclasses.fields(peftkit.GraloraConfig)}
    theirs = {f.name: f.default for f in dataclasses.fields(peft.GraloraConfig)}
    assert {k: v for k, v in theirs.items() if k in ours} == {k: ours[k] for k in theirs if k in ours}
    assert set(theirs) - set(ours) <= {"runtime_config"}


def test_block_count_must_divide_rank():
    with pytest.raises(ConfigError, match=r"gralora_k.*divisor of r=6.*\[1, 2, 3, 6\]"):
        peftkit.GraloraConfig(r=6, gralora_k=4)


def test_block_count_that_does_not_split_a_layer_fails_before_the_model_changes():
    model = FAMILY["llama"].model()
    cfg = peftkit.GraloraConfig(r=4, gralora_k=2, target_modules=["q_proj", "gate_proj"])  # gate_proj: 32 -> 37
    with untouched(model), pytest.raises(ConfigError, match=r"gate_proj.*gralora_k=2.*out_features \(37\).*allowed.*\[1\]"):
        peftkit.get_peft_model(model, cfg)
