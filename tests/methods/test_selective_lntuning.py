"""LN tuning: Hugging Face PEFT parity (config, targets, trainable count, file layout, loading both ways,
merged weights) and peftkit's default targets where PEFT has none."""

from __future__ import annotations

import dataclasses

import peft
import pytest
import torch

import peftkit
from peftkit import LNTuningConfig, PeftConfig, get_peft_model
from peftkit.targeting import TargetError

from ..families import FAMILY
from ..parity import perturb

# PEFT has default targets for these; BERT needs them explicit in PEFT
EXPLICIT = {"bert": {"target_modules": ["LayerNorm"]}}


def configs(name: str, **kwargs):
    family = FAMILY[name]
    kw = {**({"task_type": family.task_type} if family.task_type else {}), **EXPLICIT.get(name, {}), **kwargs}
    return peft.LNTuningConfig(**kw), LNTuningConfig(**kw)


def test_config_fields_and_defaults_match_peft():
    ours = {f.name for f in dataclasses.fields(LNTuningConfig)}
    theirs = {f.name for f in dataclasses.fields(peft.LNTuningConfig)}
    assert ours == theirs
    a, b = LNTuningConfig(), peft.LNTuningConfig()
    for name in theirs - {"peft_type", "peft_version"}:
        assert getattr(a, name) == getattr(b, name), name
    assert a.peft_type == "LN_TUNING"


def test_merge_and_unload_with_a_head_gives_the_plain_model():
    family = FAMILY["bert"]
    _, cfg = configs("bert")
    model = get_peft_model(family.model(), cfg).eval()
    perturb(model, scale=0.3)
    expected = family.run(model)
    plain = model.merge_and_unload()
    assert plain.state_dict().keys() == family.model().state_dict().keys()
    torch.testing.assert_close(family.run(plain), expected, atol=1e-6, rtol=0)


def test_default_targets_where_peft_has_none():
    family = FAMILY["bert"]
    with pytest.raises(ValueError, match="target_modules"):
        peft.get_peft_model(family.model(), peft.LNTuningConfig(task_type="SEQ_CLS"))
    model = get_peft_model(family.model(), LNTuningConfig(task_type="SEQ_CLS"))
    norms = {n for n, m in family.model().named_modules() if isinstance(m, torch.nn.LayerNorm)}
    assert {n for n, _ in model.base_model.adapter_layers()} == norms
    assert peftkit.selection_summary(model)["selected"] == len(norms) * 2 * 32
    # written into the config, so a saved adapter names its modules
    assert sorted(model.peft_config["default"].target_modules) == sorted(norms)


@pytest.mark.parametrize("name", ["vit", "clip", "unet"])
def test_default_targets_are_the_norm_layers(name):
    family = FAMILY[name]
    model = get_peft_model(family.model(), LNTuningConfig())
    wrapped = {n for n, _ in model.base_model.adapter_layers()}
    norms = {n for n, m in family.model().named_modules() if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm))}
    assert wrapped == norms


def test_disable_and_reenable_reproduce_outputs_exactly():
    family = FAMILY["gpt2"]
    model = get_peft_model(family.model(), LNTuningConfig()).eval()
    base_out = family.run(family.model())
    perturb(model, scale=0.3)
    tuned = family.run(model)
    assert not torch.allclose(tuned, base_out)
    for _ in range(2):
        with model.disable_adapter():
            assert torch.equal(family.run(model), base_out)
        assert torch.equal(family.run(model), tuned)


def test_container_target_is_rejected():
    with pytest.raises(TargetError, match="container"):
        get_peft_model(FAMILY["bert"].model(), LNTuningConfig(target_modules=["attention.output"]))


def test_configured_from_a_dict():
    config = PeftConfig.from_dict({"peft_type": "LN_TUNING", "task_type": "CAUSAL_LM"})
    model = get_peft_model(FAMILY["llama"].model(), config)
    assert model.get_nb_trainable_parameters()[0] == 5 * 32  # 2 layers x 2 RMSNorms + the final norm
