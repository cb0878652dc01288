"""``LoraConfig._register_custom_module`` (peft's experimental API for layer types LoRA does not know, issue 19).

peft maps a layer type to a LoRA layer class of its own API (a ``LoraLayer`` subclass); peftkit maps it to an
``Adapter`` subclass (usually of ``LoraAdapter``), the adapter's math on that base (docs/compatibility.md,
'Custom layer types'). The same user layer, adapted both ways, gives the same outputs and file keys."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn

import peftkit
from peftkit.methods.lora.layer import LoraAdapter
from peftkit.targeting import TargetError


class MyLinear(nn.Module):
    """A user's own linear layer (not an nn.Linear subclass)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.in_features, self.out_features = d_in, d_out
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / d_in ** 0.5)
        self.bias = nn.Parameter(torch.zeros(d_out))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class MyTanh(nn.Module):
    """A user's layer that is not linear in its input: tanh(x W^T)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d, d) / d ** 0.5)

    def forward(self, x):
        return torch.tanh(x @ self.weight.T)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = MyLinear(8, 12)
        self.mid = MyTanh(12)
        self.out = nn.Linear(12, 4)

    def forward(self, x):
        return self.out(self.mid(torch.relu(self.inp(x))))


class MyLinearLora(LoraAdapter):
    """LoRA's own math applies to any layer computed as x W^T + b: nothing to add."""


class MyTanhLora(LoraAdapter):
    """tanh(x (W + s B A)^T): the layer's output cannot take an additive term, so the forward recomputes it with
    the effective weight; merging (``delta_weight``) is LoRA's."""

    def forward(self, base, x, out):
        return torch.tanh(x @ (base.weight + self.delta_weight(base)).T)

    def fused_forward(self, base, x):
        return None


def _net() -> Net:
    torch.manual_seed(0)
    return Net()


def test_unknown_layer_type_is_refused_without_registration():
    with pytest.raises(TargetError, match="MyLinear"):
        peftkit.get_peft_model(_net(), peftkit.LoraConfig(r=2, target_modules=["inp"]))


@pytest.mark.parametrize("lib", [peftkit, peft], ids=["peftkit", "peft"])
def test_registered_layer_type_matches_peft(lib, tmp_path):
    torch.manual_seed(1)
    ref = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["inp", "out"], init_lora_weights=False)
    ref._register_custom_module({MyLinear: PeftLoraLinear})
    reference = peft.get_peft_model(_net(), ref).eval()
    state = peft.get_peft_model_state_dict(reference)
    assert "base_model.model.inp.lora_A.weight" in state
    x = torch.randn(5, 8)
    with torch.no_grad():
        expected = reference(x)

    config = lib.LoraConfig(r=2, lora_alpha=4, target_modules=["inp", "out"])
    assert config._custom_modules is None
    config._register_custom_module({MyLinear: MyLinearLora if lib is peftkit else PeftLoraLinear})
    model = lib.get_peft_model(_net(), config).eval()
    assert set(lib.get_peft_model_state_dict(model)) == set(state)
    lib.set_peft_model_state_dict(model, state)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)
        model.merge_adapter()
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)
        model.unmerge_adapter()
    # the registration is not saved; loading needs it again (a config passed in), as in peft
    model.save_pretrained(tmp_path)
    assert "_custom_modules" not in (tmp_path / "adapter_config.json").read_text()
    loaded = lib.PeftModel.from_pretrained(_net(), tmp_path, config=config)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, atol=1e-5, rtol=0)


def test_custom_layer_with_its_own_math():
    config = peftkit.LoraConfig(r=2, lora_alpha=4, target_modules=["mid"], init_lora_weights=False)
    config._register_custom_module({MyTanh: MyTanhLora})
    base = _net()
    model = peftkit.get_peft_model(copy.deepcopy(base), config)
    adapter = model.base_model.model.mid.adapters["default"]
    assert type(adapter) is MyTanhLora
    x = torch.randn(5, 8)
    with torch.no_grad():
        unmerged = model(x)
        assert (unmerged - base(x)).abs().max() > 1e-3
        weight = base.mid.weight + adapter.scaling * adapter.lora_B @ adapter.lora_A
        expected = base.out(torch.tanh(torch.relu(base.inp(x)) @ weight.T))
        torch.testing.assert_close(unmerged, expected, atol=1e-6, rtol=0)
        model.merge_adapter()
        torch.testing.assert_close(model(x), unmerged, atol=1e-6, rtol=0)
        model.unmerge_adapter()
        assert torch.equal(model.base_model.model.mid.base_layer.weight, base.mid.weight)
        with model.disable_adapter():
            torch.testing.assert_close(model(x), base(x), atol=0, rtol=0)
    model(x).sum().backward()
    assert adapter.lora_A.grad is not None and adapter.lora_B.grad.abs().sum() > 0


def test_a_peft_layer_class_is_refused_with_what_to_write():
    config = peftkit.LoraConfig(r=2, target_modules=["inp"])
    with pytest.raises(TypeError, match=r"not a peftkit Adapter subclass.*LoraAdapter"):
        config._register_custom_module({MyLinear: PeftLoraLinear})
    with pytest.raises(TypeError, match="not an nn.Module subclass"):
        config._register_custom_module({int: MyLinearLora})
    assert config._custom_modules is None
