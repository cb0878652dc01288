"""Compatibility with the reference implementation, Hugging Face PEFT (test dependency only).

Adapters trained a few steps in one library load into the other with the same outputs; the same config
gives the same trainable-parameter count; PiSSA / OLoRA / DoRA initialisation give the same numbers.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import peftkit

from .families import FAMILY
from .parity import assert_loads_both_ways, train_a_little

FAMILIES = ["bert", "roberta", "gpt2", "llama", "t5", "vit", "convnet", "clip", "unet"]
VARIANTS = {
    "lora": {"r": 4, "lora_alpha": 8},
    "rslora": {"r": 4, "lora_alpha": 8, "use_rslora": True},
    "dora": {"r": 4, "lora_alpha": 8, "use_dora": True},
}


# peft has no default targets for these (transformers 5 renamed ViT's layers; no diffusers table)
EXPLICIT = {"vit": ["q_proj", "v_proj"], "clip": ["q_proj", "v_proj"], "unet": ["to_q", "to_v"]}


def configs(family, kwargs):
    extra = {"task_type": family.task_type} if family.task_type else {}
    targets = family.targets or EXPLICIT.get(family.name)
    if targets:
        extra["target_modules"] = targets
    return peft.LoraConfig(**kwargs, **extra), peftkit.LoraConfig(**kwargs, **extra)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", FAMILIES)
def test_adapter_files_load_both_ways(name, variant, tmp_path):
    family = FAMILY[name]
    ref_cfg, our_cfg = configs(family, VARIANTS[variant])
    assert_loads_both_ways(family, ref_cfg, our_cfg, tmp_path)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", FAMILIES)
def test_same_trainable_parameter_count(name, variant):
    family = FAMILY[name]
    ref_cfg, our_cfg = configs(family, VARIANTS[variant])
    ref = peft.get_peft_model(family.model(), ref_cfg).get_nb_trainable_parameters()
    ours = peftkit.get_peft_model(family.model(), our_cfg).get_nb_trainable_parameters()
    assert ours == ref


def _pairs(ref_model, our_model):
    """(peft LoraLayer, peftkit AdapterLayer) for each targeted module, by path."""
    ref = {n: m for n, m in ref_model.base_model.model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    ours = dict(our_model.base_model.adapter_layers())
    assert ref.keys() == ours.keys()
    return [(ref[k], ours[k]) for k in sorted(ref)]


# peft's OLoRA ignores fan_in_fan_out (GPT-2's Conv1D gets A of shape (r, d_out)): compared on Llama only
@pytest.mark.parametrize(("name", "init"), [("llama", "pissa"), ("gpt2", "pissa"), ("llama", "olora")])
def test_pissa_olora_initialisation_matches(name, init):
    family = FAMILY[name]
    ref_cfg, our_cfg = configs(family, {"r": 4, "lora_alpha": 8, "init_lora_weights": init})
    ref = peft.get_peft_model(family.model(), ref_cfg)
    ours = peftkit.get_peft_model(family.model(), our_cfg)
    for r, o in _pairs(ref, ours):
        a = o.adapters["default"]
        torch.testing.assert_close(a.lora_A, r.lora_A["default"].weight, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(a.lora_B, r.lora_B["default"].weight, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(o.base_layer.weight, r.base_layer.weight, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(family.run(ours), family.run(ref), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["llama", "gpt2", "convnet", "bert"])
def test_dora_magnitude_initialisation_matches(name):
    family = FAMILY[name]
    ref_cfg, our_cfg = configs(family, {"r": 4, "use_dora": True, "init_lora_weights": False})
    torch.manual_seed(5)
    ref = peft.get_peft_model(family.model(), ref_cfg)
    ours = peftkit.get_peft_model(family.model(), our_cfg)
    with torch.no_grad():
        for r, o in _pairs(ref, ours):  # same non-zero A, B; then the magnitude is recomputed from them
            a = o.adapters["default"]
            a.lora_A.copy_(r.lora_A["default"].weight)
            a.lora_B.copy_(r.lora_B["default"].weight)
            norm = a._full_norm(o.base_layer).reshape(a.magnitude.shape)
            r.lora_magnitude_vector["default"].update_layer(
                base_layer=r.get_base_layer(), lora_A=r.lora_A["default"].weight,
                lora_B=r.lora_B["default"].weight, scaling=r.scaling["default"])
            torch.testing.assert_close(norm, r.lora_magnitude_vector["default"].weight, atol=1e-5, rtol=1e-5)
            a.magnitude.copy_(norm)
    torch.testing.assert_close(family.run(ours), family.run(ref), atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_default_init_starts_at_base_like_peft(variant):
    family = FAMILY["llama"]
    ref_cfg, our_cfg = configs(family, VARIANTS[variant])
    ours = peftkit.get_peft_model(family.model(), our_cfg)
    ref = peft.get_peft_model(family.model(), ref_cfg)
    for r, o in _pairs(ref, ours):
        a = o.adapters["default"]
        assert torch.count_nonzero(a.lora_B) == 0 and torch.count_nonzero(r.lora_B["default"].weight) == 0
        bound = 1 / a.lora_A.shape[1] ** 0.5  # Kaiming-uniform(a=sqrt 5) bound on A
        assert a.lora_A.abs().max() <= bound and a.lora_A.abs().max() > 0.5 * bound
    torch.testing.assert_close(family.run(ours), family.run(ref), atol=0, rtol=0)


def test_modules_to_save_and_bias_round_trip_with_peft(tmp_path):
    family = FAMILY["bert"]
    kwargs = {"r": 4, "bias": "lora_only", "modules_to_save": ["pooler.dense"]}
    theirs = peft.get_peft_model(family.model(), peft.LoraConfig(task_type="SEQ_CLS", **kwargs))
    train_a_little(theirs, family)
    theirs.save_pretrained(tmp_path)
    ours = peftkit.PeftModel.from_pretrained(family.model(), tmp_path)
    torch.testing.assert_close(family.run(ours), family.run(theirs), atol=1e-5, rtol=0)
    ref_keys = set(peft.get_peft_model_state_dict(theirs))
    assert set(peftkit.get_peft_model_state_dict(ours)) == ref_keys
    assert any(k.endswith("classifier.weight") for k in ref_keys)
    assert any(k.endswith("query.base_layer.bias") for k in ref_keys)


def test_non_default_adapter_goes_to_subfolder_like_peft(tmp_path):
    family = FAMILY["llama"]
    ours = peftkit.get_peft_model(family.model(), peftkit.LoraConfig(r=2))
    ours.add_adapter("other", peftkit.LoraConfig(r=3, target_modules=["k_proj"]))
    ours.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()
    ref = peft.PeftModel.from_pretrained(family.model(), tmp_path)
    ref.load_adapter(tmp_path / "other", adapter_name="other")
    assert ref.peft_config["other"].r == 3
    assert copy.copy(set(ref.peft_config)) == {"default", "other"}


def test_olora_on_transposed_conv1d_starts_at_base():
    family = FAMILY["gpt2"]
    base = family.run(family.model())
    ours = peftkit.get_peft_model(family.model(), peftkit.LoraConfig(r=4, init_lora_weights="olora"))
    a = ours.base_model.adapter_layers()[0][1].adapters["default"]
    assert tuple(a.lora_A.shape) == (4, 32) and tuple(a.lora_B.shape) == (96, 4)
    torch.testing.assert_close(family.run(ours), base, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", ["bert", "gpt2", "llama", "convnet"])
def test_gradients_match_peft(name, variant, tmp_path):
    """Same adapter weights, same batch: the same gradients on A, B and the DoRA magnitude."""
    family = FAMILY[name]
    ref_cfg, _ = configs(family, VARIANTS[variant])
    theirs = peft.get_peft_model(family.model(), ref_cfg)
    train_a_little(theirs, family, steps=1)
    theirs.save_pretrained(tmp_path)
    ours = peftkit.PeftModel.from_pretrained(family.model(), tmp_path, is_trainable=True)
    grads = []
    for model in (theirs, ours):
        model.train()
        model.zero_grad()
        family.run(model).float().pow(2).mean().backward()
        state = peft.get_peft_model_state_dict(model) if model is theirs else peftkit.get_peft_model_state_dict(model)
        grads.append({k: v.grad for k, v in _live(model, state).items()})
    assert grads[0].keys() == grads[1].keys()
    for key in grads[0]:
        if grads[0][key] is None:
            assert grads[1][key] is None, key
            continue
        torch.testing.assert_close(grads[1][key], grads[0][key], atol=1e-5, rtol=1e-4, msg=key)


def _live(model, state):
    """Checkpoint key -> the live parameter (the state-dict helpers return detached tensors)."""
    params = {p.data_ptr(): p for p in model.parameters()}
    return {k: params[v.data_ptr()] for k, v in state.items()}
