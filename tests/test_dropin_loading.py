"""Loading options of peft's API that peftkit honours as peft does (issue 19): ``low_cpu_mem_usage`` (adapter
tensors on the meta device until a state dict is loaded) and ``ignore_mismatched_sizes`` (tensors of another
shape are skipped with a warning). Each behaviour runs against peft 0.21.2 too."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaModel

import peftkit
from peftkit.checkpoint import CheckpointError


def _llama_model() -> LlamaModel:
    torch.manual_seed(0)
    return LlamaModel(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=2))


IDS = torch.tensor([[1, 5, 7, 9, 3, 2]])


def _run(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).last_hidden_state


def _adapter_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if "lora_" in n or ".adapters." in n}


def _trained(base: nn.Module, **kw):
    """A peft model with non-trivial LoRA weights (init_lora_weights=False), its state dict and outputs."""
    torch.manual_seed(1)
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **kw)).eval()
    return ref, peft.get_peft_model_state_dict(ref), _run(ref)


LORA = dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"])


@pytest.mark.parametrize("lib", [peftkit, peft], ids=["peftkit", "peft"])
def test_get_peft_model_low_cpu_mem_usage_builds_on_meta(lib):
    base = _llama_model()
    _, state, expected = _trained(base, **LORA)
    model = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(**LORA), low_cpu_mem_usage=True)
    params = _adapter_params(model)
    assert len(params) == 12 and all(p.is_meta for p in params.values())
    assert not any(p.is_meta for n, p in model.named_parameters() if n not in params)
    lib.set_peft_model_state_dict(model, state, low_cpu_mem_usage=True)
    params = _adapter_params(model)
    assert not any(p.is_meta for p in params.values())
    assert all(p.requires_grad for p in params.values())  # a new adapter, trainable
    torch.testing.assert_close(_run(model.eval()), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("lib", [peftkit, peft], ids=["peftkit", "peft"])
def test_add_adapter_and_inject_low_cpu_mem_usage(lib):
    base = _llama_model()
    _, state, expected = _trained(base, **LORA)
    model = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(r=2, target_modules=["k_proj"]))
    model.add_adapter("other", lib.LoraConfig(**LORA), low_cpu_mem_usage=True)
    other = {n: p for n, p in _adapter_params(model).items() if "other" in n}
    assert len(other) == 12 and all(p.is_meta for p in other.values())
    lib.set_peft_model_state_dict(model, state, adapter_name="other", low_cpu_mem_usage=True)
    assert not any(p.is_meta for p in model.parameters())
    model.set_adapter("other")
    torch.testing.assert_close(_run(model.eval()), expected, atol=1e-5, rtol=0)

    bare = lib.inject_adapter_in_model(lib.LoraConfig(**LORA), copy.deepcopy(base), low_cpu_mem_usage=True)
    assert all(p.is_meta for p in _adapter_params(bare).values()) and _adapter_params(bare)
    bare_state = {k.removeprefix("base_model.model."): v for k, v in state.items()}
    lib.set_peft_model_state_dict(bare, bare_state, low_cpu_mem_usage=True)
    assert not any(p.is_meta for p in bare.parameters())
    torch.testing.assert_close(_run(bare.eval()), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("lib", [peftkit, peft], ids=["peftkit", "peft"])
def test_from_pretrained_and_load_adapter_low_cpu_mem_usage(lib, tmp_path):
    base = _llama_model()
    ref, _, expected = _trained(base, **LORA)
    ref.save_pretrained(tmp_path)
    plain = lib.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    low = lib.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, low_cpu_mem_usage=True)
    assert not any(p.is_meta for p in low.parameters())
    torch.testing.assert_close(_run(low), _run(plain), atol=0, rtol=0)
    torch.testing.assert_close(_run(low), expected, atol=1e-5, rtol=0)
    low.load_adapter(tmp_path, adapter_name="again", low_cpu_mem_usage=True)
    assert not any(p.is_meta for p in low.parameters())
    low.set_adapter("again")
    torch.testing.assert_close(_run(low), expected, atol=1e-5, rtol=0)


class Net(nn.Module):
    def __init__(self, labels: int) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.head = nn.Linear(8, labels)

    def forward(self, x):
        return self.head(torch.relu(self.lin(x)))


def _net(labels: int) -> Net:
    torch.manual_seed(0)
    return Net(labels)


@pytest.mark.parametrize("lib", [peftkit, peft], ids=["peftkit", "peft"])
@pytest.mark.parametrize("how", ["from_pretrained", "load_adapter", "set_state_dict"])
def test_ignore_mismatched_sizes_skips_those_tensors_with_a_warning(lib, how, tmp_path):
    torch.manual_seed(3)
    cfg = dict(r=2, target_modules=["lin"], modules_to_save=["head"], init_lora_weights=False)
    trained = peft.get_peft_model(_net(3), peft.LoraConfig(**cfg))
    with torch.no_grad():
        trained.base_model.model.head.modules_to_save["default"].weight.add_(1.0)
    trained.save_pretrained(tmp_path)
    state = peft.get_peft_model_state_dict(trained)
    x = torch.randn(4, 8)
    with torch.no_grad():
        lora_out = trained.base_model.model.lin(x)  # the LoRA layer, which loads
    target = _net(5)
    with torch.no_grad():
        head_out = target.head(torch.relu(lora_out))  # the head is skipped: the new model's own
    with pytest.warns(UserWarning, match=r"(?s)ignore_mismatched_sizes=True`: .*- \S*head\S*weight: found shape "
                                         r"torch.Size\(\[3, 8\]\) in the checkpoint and torch.Size\(\[5, 8\]\)"):
        if how == "from_pretrained":
            model = lib.PeftModel.from_pretrained(target, tmp_path, ignore_mismatched_sizes=True)
        elif how == "load_adapter":
            model = lib.get_peft_model(target, lib.LoraConfig(r=4, target_modules=["lin"], modules_to_save=["head"]))
            model.load_adapter(tmp_path, adapter_name="loaded", ignore_mismatched_sizes=True)
            model.set_adapter("loaded")
        else:
            model = lib.get_peft_model(target, lib.LoraConfig(**cfg))
            lib.set_peft_model_state_dict(model, state, ignore_mismatched_sizes=True)
    with torch.no_grad():
        torch.testing.assert_close(model.base_model.model.lin(x), lora_out, atol=1e-6, rtol=0)
        torch.testing.assert_close(model(x), head_out, atol=1e-6, rtol=0)


def test_mismatched_sizes_raise_without_the_flag(tmp_path):
    cfg = dict(r=2, target_modules=["lin"], modules_to_save=["head"])
    peft.get_peft_model(_net(3), peft.LoraConfig(**cfg)).save_pretrained(tmp_path)
    target = _net(5)
    before = list(target.named_modules())
    with pytest.raises(CheckpointError, match=r"shape mismatch for 'base_model\.model\.head\.bias': "
                                              r"checkpoint \(3,\), model \(5,\)"):
        peftkit.PeftModel.from_pretrained(target, tmp_path)
    assert list(target.named_modules()) == before
    model = peftkit.get_peft_model(target, peftkit.LoraConfig(**cfg))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        model.load_adapter(tmp_path, adapter_name="other")
    assert list(model.peft_config) == ["default"]
