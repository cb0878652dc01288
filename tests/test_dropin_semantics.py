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


def _causal_pair():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2))
    base.config._name_or_path = base.name_or_path = "org/tiny-llama"
    cfg = dict(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", init_lora_weights=False)
    return (peftkit.get_peft_model(copy.deepcopy(base), peftkit.LoraConfig(**cfg)),
            peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg)))


def test_model_card_metadata_as_peft(tmp_path):
    from huggingface_hub import ModelCard

    ours, theirs = _causal_pair()
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    a, b = ModelCard.load(tmp_path / "ours/README.md"), ModelCard.load(tmp_path / "theirs/README.md")
    for key in ("library_name", "tags", "pipeline_tag", "base_model"):
        assert a.data.to_dict().get(key) == b.data.to_dict().get(key), key
    assert a.data.to_dict()["base_model"] == "org/tiny-llama" and "base_model:adapter:org/tiny-llama" in a.data.tags
    card = tmp_path / "ours/README.md"  # an existing card keeps its text; the version line is added once
    card.write_text(card.read_text().replace("# Model Card for Model ID", "# My adapter"))
    ours.save_pretrained(tmp_path / "ours")
    text = card.read_text()
    assert "# My adapter" in text and text.count(f"- peftkit {peftkit.__version__}") == 1


def test_peft_model_switches_and_reports_as_peft():
    ours, theirs = _causal_pair()
    ids = torch.randint(0, 50, (1, 6))
    with torch.no_grad():
        adapted = ours(input_ids=ids).logits
        for model in (ours, theirs):
            assert model.has_active_enabled_adapter and model.active_adapter == "default"
            assert model.base_model.active_adapter == ["default"]
            with model.disable_adapter():
                assert not model.has_active_enabled_adapter
            model.disable_adapter_layers()
        # peft's flag only follows the disable_adapter() block; peftkit's follows the layers (docs/compatibility.md)
        assert not ours.has_active_enabled_adapter and theirs.has_active_enabled_adapter
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-5, rtol=0)
        assert not torch.allclose(ours(input_ids=ids).logits, adapted)
        ours.enable_adapter_layers()
        theirs.enable_adapter_layers()
        torch.testing.assert_close(ours(input_ids=ids).logits, adapted, atol=0, rtol=0)
    assert ours.supports_lora_conversion() is theirs.supports_lora_conversion() is True
    assert ours.modules_to_save == theirs.modules_to_save  # None: no module trained in full
    prompt = peftkit.get_peft_model(_llama_model(), peftkit.PromptTuningConfig(num_virtual_tokens=2))
    assert prompt.supports_lora_conversion() is False
    head = peftkit.get_peft_model(_llama_model(), peftkit.LoraConfig(r=2, target_modules=["q_proj"],
                                                                     modules_to_save=["norm"]))
    assert head.modules_to_save == {"norm"}
    assert [s.name for s in ours.get_layer_status()] == [s.name for s in theirs.get_layer_status()]
    assert ours.get_model_status().enabled == theirs.get_model_status().enabled is True


def test_push_to_hub_offline_says_what_to_do(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    ours, _ = _causal_pair()
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE.*save_pretrained"):
        ours.push_to_hub("org/adapter")
