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
from ..parity import assert_loads_both_ways, assert_merges_like_peft, assert_same_file_layout, assert_same_trainable_state
from ..parity import perturb

# PEFT has default targets for these; BERT needs them explicit in PEFT
EXPLICIT = {"bert": {"target_modules": ["LayerNorm"]}}
FAMILIES = ["llama", "gpt2", "t5", "bert"]


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


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


@pytest.mark.parametrize("name", FAMILIES)
def test_same_targets_trainable_count_and_state_keys_as_peft(name):
    family = FAMILY[name]
    ref_cfg, our_cfg = configs(name)
    theirs = peft.get_peft_model(family.model(), ref_cfg)
    ours = get_peft_model(family.model(), our_cfg)
    assert_same_trainable_state(theirs, ours)
    ref_targets = {n for n, m in theirs.base_model.model.named_modules() if isinstance(m, peft.tuners.ln_tuning.layer.LNTuningLayer)}
    assert {n for n, _ in ours.base_model.adapter_layers()} == ref_targets
    assert sorted(ours.peft_config["default"].target_modules) == sorted(theirs.peft_config["default"].target_modules)


def train(model, family):
    perturb(model, scale=0.3, seed=4, only="")


@pytest.mark.parametrize("name", FAMILIES)
def test_adapter_files_load_both_ways(name, tmp_path):
    family = FAMILY[name]
    ref_cfg, our_cfg = configs(name)
    assert_loads_both_ways(family, ref_cfg, our_cfg, tmp_path, train=train)
    assert_same_file_layout(tmp_path, ".ln_tuning_layers.weight")


# BERT (SEQ_CLS) is left out: PEFT's LN tuning merge_and_unload keeps the classifier's ModulesToSaveWrapper
# (keys ``classifier.original_module.*``); peftkit returns the plain model (checked below)
@pytest.mark.parametrize("name", ["llama", "gpt2", "t5"])
def test_merge_matches_peft_and_unmerge_restores_bits(name, tmp_path):
    family = FAMILY[name]
    ref_cfg, _ = configs(name)
    theirs = peft.get_peft_model(family.model(), ref_cfg)
    train(theirs, family)
    theirs.save_pretrained(tmp_path)
    ours = peftkit.PeftModel.from_pretrained(family.model(), tmp_path)
    tuned = {n for n, _ in ours.base_model.adapter_layers()}
    changed = assert_merges_like_peft(family, theirs, ours)
    assert changed and all(k.rpartition(".")[0] in tuned or k.startswith("classifier") for k in changed), changed


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
