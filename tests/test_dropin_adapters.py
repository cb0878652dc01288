"""Several adapters on one model behave as in Hugging Face PEFT: loading a trainable adapter, modules_to_save
under any adapter name, add_weighted_adapter and set_adapter with saved modules, and the checks PEFT makes
when a second adapter is added (each error leaves the model as it was)."""

from __future__ import annotations

import os
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit.targeting import TargetError

LIBS = [peft, peftkit]


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(8, 8)
        self.lin1 = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)
        self.md = nn.ModuleDict({"a": nn.Linear(8, 8)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lin1(self.lin0(x)))


def lora(lib, **kwargs):
    kwargs.setdefault("target_modules", ["lin0"])
    return lib.LoraConfig(r=2, **kwargs)


def tiny() -> Tiny:
    torch.manual_seed(0)
    return Tiny()


def snapshot(model) -> tuple:
    """What a failed call must leave as it was."""
    return (
        [(n, type(m)) for n, m in model.named_modules()],
        [(n, p.requires_grad) for n, p in model.named_parameters()],
        sorted(model.peft_config),
        list(model.active_adapters),
    )


def _perturb_head(model, adapter: str) -> None:
    with torch.no_grad():
        for p in model.base_model.model.head.modules_to_save[adapter].parameters():
            p.add_(1.0)


# -- A ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lib", LIBS, ids=lambda m: m.__name__)
def test_load_adapter_is_trainable_new_name_trains_it_inactive(lib, tmp_path):
    model = lib.get_peft_model(tiny(), lora(lib))
    model.save_pretrained(tmp_path)
    frozen_before = model.get_nb_trainable_parameters()[0]
    model.load_adapter(tmp_path, "other", is_trainable=True)
    assert model.active_adapters == ["default"]  # not activated
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(".other." in n for n in names) and any(".default." in n for n in names)
    assert model.get_nb_trainable_parameters()[0] == 2 * frozen_before
    model.load_adapter(tmp_path, "frozen")  # is_trainable=False: frozen
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".frozen." in n)


# -- B, C ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lib", LIBS, ids=lambda m: m.__name__)
def test_add_adapter_gives_a_second_copy_of_an_already_saved_module(lib):
    model = lib.get_peft_model(tiny(), lora(lib, modules_to_save=["head"]))
    model.add_adapter("two", lora(lib, modules_to_save=["head"]))
    assert sorted(model.base_model.model.head.modules_to_save) == ["default", "two"]


def test_second_adapter_modules_to_save_file_keys_match_peft_and_load_under_any_name(tmp_path):
    keys = {}
    for lib in LIBS:
        model = lib.get_peft_model(tiny(), lora(lib, modules_to_save=["head"]))
        model.add_adapter("two", lora(lib, modules_to_save=["head"]))
        _perturb_head(model, "two")
        model.save_pretrained(tmp_path / lib.__name__)
        keys[lib.__name__] = sorted(load_file(os.path.join(tmp_path / lib.__name__, "two",
                                                           "adapter_model.safetensors")))
    assert keys["peftkit"] == keys["peft"]
    expected = tiny().head.weight + 1.0
    for saved in ("peft", "peftkit"):
        folder = tmp_path / saved / "two"
        model = peftkit.get_peft_model(tiny(), lora(peftkit))
        model.load_adapter(folder, "two")
        torch.testing.assert_close(model.base_model.model.head.modules_to_save["two"].weight, expected)
        loaded = peftkit.PeftModel.from_pretrained(tiny(), folder, adapter_name="xx")
        torch.testing.assert_close(loaded.base_model.model.head.modules_to_save["xx"].weight, expected)
    theirs = peft.PeftModel.from_pretrained(tiny(), tmp_path / "peftkit" / "two", adapter_name="xx")
    torch.testing.assert_close(theirs.base_model.model.head.modules_to_save["xx"].weight, expected)


# -- D ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lib", LIBS, ids=lambda m: m.__name__)
def test_add_weighted_adapter_keeps_the_one_saved_module(lib):
    model = lib.get_peft_model(tiny(), lora(lib, modules_to_save=["head"]))
    model.add_adapter("two", lora(lib))
    model.add_weighted_adapter(["default", "two"], [1.0, 1.0], "mix", combination_type="cat")
    assert sorted(model.base_model.model.head.modules_to_save) == ["default", "mix"]
    assert model.peft_config["mix"].modules_to_save == ["head"]


def test_add_weighted_adapter_copies_the_trained_saved_module():
    """peftkit keeps the trained copy (PEFT gives the merged adapter a fresh copy of the original module)."""
    model = peftkit.get_peft_model(tiny(), lora(peftkit, modules_to_save=["head"]))
    model.add_adapter("two", lora(peftkit))
    _perturb_head(model, "default")
    model.add_weighted_adapter(["default", "two"], [1.0, 1.0], "mix", combination_type="cat")
    head = model.base_model.model.head
    torch.testing.assert_close(head.modules_to_save["mix"].weight, head.modules_to_save["default"].weight)


@pytest.mark.parametrize("lib", LIBS, ids=lambda m: m.__name__)
def test_add_weighted_adapter_refuses_two_saved_copies_of_a_module(lib):
    model = lib.get_peft_model(tiny(), lora(lib, modules_to_save=["head"]))
    model.add_adapter("two", lora(lib, modules_to_save=["head"]))
    before = snapshot(model)
    with pytest.raises(ValueError, match="modules_to_save"):
        model.add_weighted_adapter(["default", "two"], [1.0, 1.0], "mix", combination_type="cat")
    assert snapshot(model) == before


# -- E ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lib", LIBS, ids=lambda m: m.__name__)
def test_set_adapter_refuses_two_adapters_saving_the_same_module(lib):
    model = lib.get_peft_model(tiny(), lora(lib, modules_to_save=["head"]))
    model.add_adapter("two", lora(lib, modules_to_save=["head"]))
    before = snapshot(model)
    with pytest.raises(ValueError, match="Only one adapter can be set at a time|only one adapter can be set"):
        model.base_model.set_adapter(["default", "two"])
    if lib is peftkit:  # peft has switched some layers by then
        assert snapshot(model) == before


def test_set_adapter_accepts_two_adapters_when_one_saves_the_module():
    model = peftkit.get_peft_model(tiny(), lora(peftkit, modules_to_save=["head"]))
    model.add_adapter("two", lora(peftkit, target_modules=["lin1"]))
    model.base_model.set_adapter(["default", "two"])
    assert model.base_model.model.head.active_adapter == "default"


# -- F ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lib", LIBS, ids=lambda m: m.__name__)
def test_only_one_adapter_may_train_biases(lib):
    model = lib.get_peft_model(tiny(), lora(lib, bias="all"))
    before = snapshot(model)
    with pytest.raises(ValueError, match="only 1 adapter with bias|only one adapter may have bias"):
        model.add_adapter("two", lora(lib, bias="lora_only"))
    if lib is peftkit:
        assert snapshot(model) == before
        model.add_adapter("three", lora(lib))  # bias="none" is fine
        other = peftkit.get_peft_model(tiny(), lora(lib))
        other.add_adapter("two", lora(lib, bias="lora_only"))  # the first one with bias


@pytest.mark.parametrize("lib", LIBS, ids=lambda m: m.__name__)
def test_adalora_trains_one_adapter(lib):
    def config(**kwargs):
        return lib.AdaLoraConfig(target_modules=["lin0"], total_step=10, init_r=4, target_r=2, **kwargs)

    model = lib.get_peft_model(tiny(), config())
    before = snapshot(model)
    with pytest.raises(ValueError, match="supports only 1 trainable adapter"):
        model.add_adapter("two", config())
    if lib is peftkit:
        assert snapshot(model) == before
    model.add_adapter("frozen", config(inference_mode=True))


@pytest.mark.parametrize("lib", LIBS, ids=lambda m: m.__name__)
def test_modules_to_save_refuses_containers_and_adapted_layers(lib):
    with pytest.raises(TypeError, match="ModuleDict"):
        lib.get_peft_model(tiny(), lora(lib, modules_to_save=["md"]))
    model = lib.get_peft_model(tiny(), lora(lib))
    before = snapshot(model)
    with pytest.raises(TypeError, match="modules_to_save"):
        model.add_adapter("two", lora(lib, target_modules=["lin1"], modules_to_save=["lin0"]))
    if lib is peftkit:
        assert snapshot(model) == before


@pytest.mark.parametrize("lib", LIBS, ids=lambda m: m.__name__)
def test_a_module_both_targeted_and_saved_is_only_saved(lib):
    model = lib.get_peft_model(tiny(), lora(lib, target_modules=["lin0", "lin1"], modules_to_save=["lin0"]))
    inner = model.base_model.model
    assert type(inner.lin0).__name__ == "ModulesToSaveWrapper"
    assert hasattr(inner.lin1, "base_layer")


@pytest.mark.parametrize("lib", LIBS, ids=lambda m: m.__name__)
def test_second_adapter_matching_nothing_raises_and_changes_nothing(lib):
    model = lib.get_peft_model(tiny(), lora(lib, modules_to_save=["head"]))
    before = snapshot(model)
    error = TargetError if lib is peftkit else ValueError  # peft: NoMatchingPeftModuleError
    with pytest.raises(error):
        model.add_adapter("two", lora(lib, target_modules=["nothing"], modules_to_save=["head"]))
    assert "two" not in model.peft_config
    if lib is peftkit:
        assert snapshot(model) == before
        assert list(model.base_model.model.head.modules_to_save) == ["default"]


@pytest.mark.parametrize("lib", LIBS, ids=lambda m: m.__name__)
@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("pattern", ["rank_pattern", "alpha_pattern"])
def test_pissa_olora_with_rslora_and_patterns_warn_as_peft(lib, init, pattern):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lora(lib, init_lora_weights=init, use_rslora=True, **{pattern: {"lin0": 4}})
        lora(lib, init_lora_weights=init, use_rslora=False, **{pattern: {"lin0": 4}})
        lora(lib, init_lora_weights=True, use_rslora=True, **{pattern: {"lin0": 4}})
    texts = [str(w.message) for w in caught if "Rank-Stabilized LoRA" in str(w.message)]
    assert len(texts) == 1 and "path_initial_model_for_weight_conversion" in texts[0]
