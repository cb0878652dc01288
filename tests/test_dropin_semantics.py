"""Behaviours where peftkit follows peft's semantics on the methods both have (adapter deletion, attribute access
through the wrappers), each checked against peft 0.21.2."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from transformers import LlamaConfig, LlamaModel

import peftkit


def _llama_model() -> LlamaModel:
    torch.manual_seed(0)
    return LlamaModel(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=2))


@pytest.mark.parametrize("lib", [peftkit, peft])
def test_attributes_reach_the_wrapped_model(lib):
    base = _llama_model()
    model = lib.get_peft_model(base, lib.LoraConfig(r=2, target_modules=["q_proj"]))
    assert model.base_model.layers is base.layers and model.layers is base.layers
    assert isinstance(model.base_model.layers, torch.nn.ModuleList)
    assert model.base_model.norm is base.norm


@pytest.mark.parametrize("lib", [peftkit, peft])
def test_delete_unknown_adapter_raises_value_error(lib):
    model = lib.get_peft_model(_llama_model(), lib.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="nope"):
        model.delete_adapter("nope")


def test_deleting_a_merged_adapter_raises_and_changes_nothing():
    model = peftkit.get_peft_model(_llama_model(), peftkit.LoraConfig(r=2, target_modules=["q_proj"],
                                                                      init_lora_weights=False))
    model.merge_adapter()
    weights = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="unmerge"):
        model.delete_adapter("default")
    assert list(model.peft_config) == ["default"]
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    model.unmerge_adapter()
    model.delete_adapter("default")
    assert not model.peft_config


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert", "vit", "unet"])
@pytest.mark.parametrize("training", [False, True])
def test_dora_starts_bit_identical_to_the_base(family, training):
    """B = 0 and m = ||W0||: DoRA's output equals the base model's bit for bit (as peft's), in eval and in
    training with autograd (several tokens: the merged-weight path in eval, the fused kernel in training)."""
    from tests.families import FAMILY

    fam = FAMILY[family]
    torch.set_num_threads(1)
    kw = {"target_modules": fam.targets} if fam.targets else {}
    with torch.set_grad_enabled(training):
        base = fam.run(fam.model().train(training))
        model = peftkit.get_peft_model(fam.model(), peftkit.LoraConfig(r=4, use_dora=True, **kw)).train(training)
        assert torch.equal(fam.run(model), base)


def test_adaption_prompt_config_defers_its_sizes_to_get_peft_model():
    from peftkit.config import ConfigError

    config = peftkit.AdaptionPromptConfig()  # as peft: built without sizes, refused when used
    assert config.adapter_len is None and peft.AdaptionPromptConfig().adapter_len is None
    model = _llama_model()
    params = list(model.parameters())
    with pytest.raises(ConfigError, match="adapter_len"):
        peftkit.get_peft_model(model, config)
    assert list(model.parameters()) == params and all(p.requires_grad for p in params)
    with pytest.raises(ConfigError, match="adapter_layers"):
        peftkit.AdaptionPromptConfig(adapter_layers=0)
