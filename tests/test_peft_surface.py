"""peft's layer API on peftkit's wrapper (peft_surface.py) and the served `peft` facade, against peft 0.21.2."""

from __future__ import annotations

import copy

import peft
import torch
from torch import nn

import peftkit
from peftkit.compat.facade import LoraLayer, build_module


def _pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    ours = peftkit.get_peft_model(copy.deepcopy(base), peftkit.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"]))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"]))
    torch.manual_seed(1)
    for (_, layer), (_, ref) in zip(_wrappers(ours), _wrappers(theirs)):
        for stem in ("lora_A", "lora_B"):
            value = torch.randn_like(getattr(ref, stem)["default"].weight)
            getattr(ref, stem)["default"].weight.data.copy_(value)
            getattr(layer, stem)["default"].weight.data.copy_(value)  # writes through the view
    return ours, theirs


def _wrappers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "get_base_layer") and n.endswith(("0", "2"))]


def test_views_are_the_adapters_own_parameters():
    ours, _ = _pair()
    name, layer = _wrappers(ours)[0]
    adapter = layer.adapters["default"]
    assert layer.lora_A["default"].weight is adapter.lora_A and layer.lora_B["default"].weight is adapter.lora_B
    assert layer.r["default"] == 2 and layer.lora_alpha["default"] == 4 and layer.scaling["default"] == 2.0
    assert layer.get_base_layer() is layer.base_layer and layer.active_adapter == "default"
    assert isinstance(layer, LoraLayer) and not isinstance(layer.base_layer, LoraLayer)
    assert set(layer.lora_A) == {"default"}


def test_delta_weight_and_set_scale_match_peft():
    ours, theirs = _pair()
    x = torch.randn(3, 8)
    for (_, layer), (_, ref) in zip(_wrappers(ours), _wrappers(theirs)):
        torch.testing.assert_close(layer.get_delta_weight("default"), ref.get_delta_weight("default"), atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
        for (_, layer), (_, ref) in zip(_wrappers(ours), _wrappers(theirs)):
            layer.set_scale("default", 0.3)
            ref.set_scale("default", 0.3)
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
        for (_, layer), (_, ref) in zip(_wrappers(ours), _wrappers(theirs)):
            layer.scaling["default"] = 5.0
            ref.scaling["default"] = 5.0
            layer.enable_adapters(False)
            ref.enable_adapters(False)
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
        for (_, layer), (_, ref) in zip(_wrappers(ours), _wrappers(theirs)):
            layer.enable_adapters(True)
            ref.enable_adapters(True)
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_set_adapter_on_a_layer_sets_trainability_as_peft():
    ours, _ = _pair()
    ours.add_adapter("other", peftkit.LoraConfig(r=2, target_modules=["0", "2"]))
    _, layer = _wrappers(ours)[0]
    layer.set_adapter("other")
    assert layer.active_adapters == ["other"]
    assert layer.adapters["other"].lora_A.requires_grad and not layer.adapters["default"].lora_A.requires_grad
    layer.delete_adapter("other")
    assert list(layer.adapters) == ["default"]


def test_facade_modules_hold_peftkit_objects():
    top = build_module("peft")
    assert top.PeftModel is peftkit.PeftModel and top.LoraConfig is peftkit.LoraConfig and top.__version__ == "0.21.2"
    assert build_module("peft.tuners.tuners_utils").BaseTunerLayer is peftkit.AdapterLayer
    utils = build_module("peft.utils")
    assert utils.get_peft_model_state_dict is peftkit.get_peft_model_state_dict
    try:
        top.NoSuchThing
    except AttributeError as err:
        assert "NoSuchThing" in str(err) and "peftkit" in str(err)
    else:
        raise AssertionError("missing names must raise")


def test_helpers_rescale_adapter_scale_and_check_if_peft_model_as_peft(tmp_path):
    from peft.helpers import check_if_peft_model as peft_check
    from peft.helpers import rescale_adapter_scale as peft_rescale

    from peftkit.helpers import check_if_peft_model, disable_input_dtype_casting, rescale_adapter_scale

    ours, theirs = _pair()
    x = torch.randn(3, 8)
    with torch.no_grad():
        before = ours(x)
        with rescale_adapter_scale(ours, 0.5), peft_rescale(theirs, 0.5):
            torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
            assert not torch.allclose(ours(x), before)
        torch.testing.assert_close(ours(x), before, atol=0, rtol=0)  # restored
        with disable_input_dtype_casting(ours):
            torch.testing.assert_close(ours(x), before, atol=0, rtol=0)
    import pytest as _pytest

    with _pytest.raises(ValueError, match="LoraLayer"), rescale_adapter_scale(nn.Linear(2, 2), 0.5):
        pass
    ours.save_pretrained(tmp_path / "a")
    assert check_if_peft_model(tmp_path / "a") and peft_check(str(tmp_path / "a"))
    assert not check_if_peft_model(tmp_path) and not peft_check(str(tmp_path))
