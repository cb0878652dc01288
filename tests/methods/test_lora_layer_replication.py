"""LoRA's layer_replication as peft 0.21.2: layers rebuilt from ranges with shared base weights, each copy with
its own LoRA; outputs and files equal to peft's both ways; merging refused; bad ranges refused before any change."""

import copy

import peft
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import peftkit
from peftkit.config import ConfigError

LLAMA = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
IDS = torch.randint(0, 99, (2, 7), generator=torch.Generator().manual_seed(0))
CFG = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], layer_replication=[[0, 2], [1, 3]])


def _base():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**LLAMA)).eval()


def _pair():
    base = _base()
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**CFG))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    ours = peftkit.get_peft_model(copy.deepcopy(base), peftkit.LoraConfig(**CFG))
    peftkit.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(ref))
    return base, ref, ours


def test_layers_repeat_with_shared_weights_and_own_adapters():
    base, ref, ours = _pair()
    layers = ours.base_model.model.model.layers
    assert len(layers) == 4 and ours.base_model.model.config.num_hidden_layers == 4
    assert [m.self_attn.layer_idx for m in layers] == [0, 1, 2, 3]
    # layers 1 and 2 are both original layer 1: one weight, two adapters
    assert layers[1].self_attn.q_proj.base_layer.weight is layers[2].self_attn.q_proj.base_layer.weight
    assert layers[1].self_attn.q_proj.adapters["default"].lora_A is not layers[2].self_attn.q_proj.adapters[
        "default"].lora_A
    assert peftkit.get_peft_model_state_dict(ours).keys() == peft.get_peft_model_state_dict(ref).keys()
    trainable = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert trainable(ours) == trainable(ref) == 4 * 2 * 4 * (32 + 32) - 4 * 4 * 16  # v_proj: 32 -> 16


def test_outputs_and_files_equal_peft(tmp_path):
    base, ref, ours = _pair()
    with torch.no_grad():
        expected = ref(IDS).logits
        torch.testing.assert_close(ours(IDS).logits, expected, atol=1e-5, rtol=0)
        assert (expected - base(IDS).logits).abs().max() > 1e-3
    ours.save_pretrained(tmp_path / "ours")
    ref.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        for loaded in (peftkit.PeftModel.from_pretrained(_base(), tmp_path / "peft"),
                       peft.PeftModel.from_pretrained(_base(), tmp_path / "ours")):
            torch.testing.assert_close(loaded(IDS).logits, expected, atol=1e-5, rtol=0)


def test_merging_shared_weights_is_refused_and_changes_nothing():
    _, _, ours = _pair()
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    with pytest.raises(ValueError, match="replicated"):
        ours.merge_and_unload()
    assert all(torch.equal(p, before[n]) for n, p in ours.named_parameters())


@pytest.mark.parametrize("bad", [[[1, 1]], [[2, 0]], [[0, 2.0]], [], [[0, 4]]])
def test_bad_ranges_are_refused_before_anything_changes(bad):
    model = _base()
    names = [n for n, _ in model.named_modules()]
    with pytest.raises(ConfigError, match="layer_replication"):
        peftkit.get_peft_model(model, peftkit.LoraConfig(r=2, target_modules=["q_proj"], layer_replication=bad))
    assert [n for n, _ in model.named_modules()] == names and model.config.num_hidden_layers == 3
