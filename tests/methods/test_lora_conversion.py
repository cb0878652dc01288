"""convert_to_lora / save_as_lora: a mergeable adapter's update as a LoRA (truncated SVD per layer), as peft 0.21.2
for the methods both convert, and for every mergeable peftkit method: the error falls with the rank and vanishes
at full rank (outputs equal), biases become lora_B.bias, files load in peftkit and peft."""

import copy

import peft
import pytest
import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

import peftkit
from peftkit import convert_to_lora, save_as_lora

LLAMA = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
IDS = torch.randint(0, 99, (2, 7), generator=torch.Generator().manual_seed(0))


def _llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**LLAMA)).eval()


def _perturb(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def _products(state):
    """B A per layer (the SVD's sign choices cancel)."""
    return {k.removesuffix(".lora_A.weight"): state[k.replace("lora_A", "lora_B")].float() @ v.float()
            for k, v in state.items() if k.endswith("lora_A.weight")}


@pytest.mark.parametrize("rank", [2, 0.9])
def test_lokr_conversion_equals_peft(rank):
    base = _llama()
    kw = dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    ref = _perturb(peft.get_peft_model(copy.deepcopy(base), peft.LoKrConfig(**kw)))
    ours = peftkit.get_peft_model(copy.deepcopy(base), peftkit.LoKrConfig(**kw))
    peftkit.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(ref))
    ref_config, ref_state = peft.convert_to_lora(ref, rank)
    config, state = convert_to_lora(ours, rank)
    assert set(state) == set(ref_state)
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in ref_state.items()}
    ref_products = _products(ref_state)
    for key, product in _products(state).items():
        torch.testing.assert_close(product, ref_products[key], atol=1e-5, rtol=1e-4)
    assert (config.r, config.lora_alpha, config.rank_pattern, config.alpha_pattern) == (
        ref_config.r, ref_config.lora_alpha, ref_config.rank_pattern, ref_config.alpha_pattern)
    assert set(config.target_modules) == set(ref_config.target_modules)


@pytest.mark.parametrize("method,kw", [
    ("loha", dict(r=4, alpha=8, target_modules=["q_proj", "o_proj"])),
    ("oft", dict(r=0, oft_block_size=8, target_modules=["q_proj", "o_proj"])),
    ("vera", dict(r=8, target_modules=["q_proj", "o_proj"])),
])
def test_error_falls_with_rank_and_vanishes_at_full_rank(method, kw):
    base = _llama()
    model = _perturb(peftkit.get_peft_model(copy.deepcopy(base), peftkit.get_method(method).config_cls(**kw)))
    errors = [max(convert_to_lora(model, r, return_errors=True)[2].values()) for r in (1, 4, 16, 32)]
    assert errors[0] > errors[1] > errors[2] > 0 and errors[-1] < 1e-5, errors
    config, state = convert_to_lora(model, 32)
    lora = peftkit.get_peft_model(copy.deepcopy(base), config)
    peftkit.set_peft_model_state_dict(lora, state)
    with torch.no_grad():
        torch.testing.assert_close(lora(IDS).logits, model(IDS).logits, atol=1e-4, rtol=1e-4)


def test_a_changed_bias_becomes_lora_bias_and_files_load_in_both(tmp_path):
    torch.manual_seed(0)
    base = BertModel(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=37)).eval()
    with torch.no_grad():  # BERT starts with zero biases: give them values, so that scaling them shows
        for name, p in base.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    model = _perturb(peftkit.get_peft_model(copy.deepcopy(base), peftkit.IA3Config(
        target_modules=["query", "value", "output.dense"], feedforward_modules=["output.dense"])))
    errors = save_as_lora(tmp_path, model, 32)
    assert max(errors.values()) < 1e-5
    config = peftkit.PeftConfig.from_pretrained(tmp_path)
    assert config.lora_bias is True  # IA3 on query / value scales the output, bias included
    with torch.no_grad():
        expected = model(IDS).last_hidden_state
        ours = peftkit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
        torch.testing.assert_close(ours(IDS).last_hidden_state, expected, atol=1e-4, rtol=1e-4)
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
        torch.testing.assert_close(theirs(IDS).last_hidden_state, expected, atol=1e-4, rtol=1e-4)


def test_bad_input_is_refused_with_what_was_expected():
    model = peftkit.get_peft_model(_llama(), peftkit.LoHaConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="rank must be >= 1"):
        convert_to_lora(model, 0)
    with pytest.raises(ValueError, match=r"threshold in \(0, 1\]"):
        convert_to_lora(model, 1.5)
    with pytest.raises(ValueError, match="larger than the weight allows"):
        convert_to_lora(model, 33)
    with pytest.raises(TypeError, match="no layer .* named 'other'"):
        convert_to_lora(model, 2, adapter_name="other")
    prompt = peftkit.get_peft_model(_llama(), peftkit.PromptTuningConfig(num_virtual_tokens=3,
                                                                         task_type="CAUSAL_LM"))
    with pytest.raises(TypeError, match="not a weight update|no layer"):
        convert_to_lora(prompt, 2)
