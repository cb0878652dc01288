"""The method registry: what it lists, how methods are looked up, and what registration rejects."""

from __future__ import annotations

import dataclasses

import pytest

import peftkit
from peftkit import LoraConfig, MethodSpec, PeftConfig, get_method, list_methods, register_method
from peftkit import registry
from peftkit.methods.lora import LoraAdapter


@pytest.fixture
def scratch_registry(monkeypatch):
    """Registration tests must not leak methods into the global registry (other suites iterate it)."""
    list_methods()  # make sure the built-ins are loaded before copying
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    return registry._METHODS


def test_list_methods_entries():
    specs = list_methods()
    assert len(specs) >= 1
    assert all(isinstance(s, MethodSpec) for s in specs)
    names = [s.name for s in specs]
    assert names == sorted(names)
    assert len(set(names)) == len(names)
    for s in specs:
        assert s.name == s.name.lower() and s.name
        assert s.category in registry.CATEGORIES
        assert set(s.modalities) <= set(registry.MODALITIES) and s.modalities
        assert isinstance(s.param_formula, str) and s.param_formula.strip()
        assert issubclass(s.config_cls, PeftConfig)
        assert s.config_cls.PEFT_TYPE and s.peft_type == s.config_cls.PEFT_TYPE
        assert isinstance(s.mergeable, bool)


def test_lora_spec():
    specs = {s.name: s for s in list_methods()}
    assert "lora" in specs
    lora = specs["lora"]
    assert lora.category == "reparameterized"
    assert lora.mergeable is True
    assert lora.config_cls is peftkit.LoraConfig
    assert lora.adapter_cls is LoraAdapter
    assert lora.peft_type == "LORA"
    assert lora.param_formula.strip() != ""
    assert set(lora.modalities) <= set(registry.MODALITIES)
    assert "text" in lora.modalities
    assert lora.inference_overhead == "none once merged"


def test_lora_examples_build_valid_configs():
    lora = get_method("lora")
    names = [n for n, _ in lora.examples]
    assert {"lora", "rslora", "dora", "pissa"} <= set(names)
    for name, kwargs in lora.examples:
        cfg = lora.config_cls(**kwargs)
        for k, v in kwargs.items():
            assert getattr(cfg, k) == v, (name, k)


def test_get_method_lookups_agree():
    by_name = get_method("lora")
    assert get_method("LORA") is by_name
    assert get_method("Lora") is by_name
    assert get_method(LoraConfig()) is by_name
    assert get_method(LoraConfig(r=4, use_dora=True)) is by_name
    assert by_name.name == "lora"


def test_get_method_subclassed_config_falls_back_to_peft_type():
    @dataclasses.dataclass
    class MyLora(LoraConfig):
        pass

    assert get_method(MyLora()) is get_method("lora")


def test_get_method_unknown_raises_listing_names():
    with pytest.raises(KeyError) as info:
        get_method("no_such_method")
    msg = str(info.value)
    assert "no_such_method" in msg
    for s in list_methods():
        assert repr(s.name) in msg


@pytest.mark.parametrize("name", ["LoRA", "Lora", "MYMETHOD"])
def test_register_rejects_uppercase_names(scratch_registry, name):
    before = dict(scratch_registry)
    with pytest.raises(ValueError) as info:
        register_method(name, config=LoraConfig, category="additive", modalities=("text",), mergeable=False,
                        param_formula="r")
    assert name in str(info.value)
    assert scratch_registry == before


@pytest.mark.parametrize("category", ["reparametrized", "Additive", "other", ""])
def test_register_rejects_unknown_category(scratch_registry, category):
    before = dict(scratch_registry)
    with pytest.raises(ValueError) as info:
        register_method("mymethod", config=LoraConfig, category=category, modalities=("text",), mergeable=False,
                        param_formula="r")
    assert "category" in str(info.value) and repr(category) in str(info.value)
    assert scratch_registry == before


@pytest.mark.parametrize("modalities", [("audio",), ("text", "speech"), ("Text",)])
def test_register_rejects_unknown_modalities(scratch_registry, modalities):
    before = dict(scratch_registry)
    with pytest.raises(ValueError) as info:
        register_method("mymethod", config=LoraConfig, category="additive", modalities=modalities,
                        mergeable=False, param_formula="r")
    bad = sorted(set(modalities) - set(registry.MODALITIES))
    assert str(bad) in str(info.value)
    assert scratch_registry == before


def test_register_accepts_valid_and_rejects_a_second_class(scratch_registry):
    @dataclasses.dataclass
    class ToyConfig(PeftConfig):
        PEFT_TYPE = "TOY"

    @register_method("toy", config=ToyConfig, category="additive", modalities=("text", "vision"),
                     mergeable=False, param_formula="d", examples={"small": {"inference_mode": False}})
    class ToyAdapter(peftkit.Adapter):
        pass

    spec = get_method("toy")
    assert spec.adapter_cls is ToyAdapter and spec.config_cls is ToyConfig
    assert get_method("TOY") is spec and get_method(ToyConfig()) is spec
    assert spec.examples == (("small", {"inference_mode": False}),)
    assert spec.inference_overhead == "extra compute per forward"
    assert [s.name for s in list_methods()] == sorted(scratch_registry)
    # re-decorating the same class is fine; a different class under the same name is not
    register_method("toy", config=ToyConfig, category="additive", modalities=("text",), mergeable=False,
                    param_formula="d")(ToyAdapter)

    class Other(peftkit.Adapter):
        pass

    with pytest.raises(ValueError, match="toy"):
        register_method("toy", config=ToyConfig, category="additive", modalities=("text",), mergeable=False,
                        param_formula="d")(Other)


def test_scratch_registration_did_not_leak():
    assert "toy" not in {s.name for s in list_methods()}


def test_a_shared_peft_type_names_the_method_that_declares_it_whatever_the_order(monkeypatch):
    """P-tuning v2 saves as PREFIX_TUNING (its config inherits prefix tuning's type): the type names prefix
    tuning, also when P-tuning v2 registered first; a registry name always names its own method."""
    list_methods()
    reordered = dict(sorted(registry._METHODS.items(), key=lambda kv: kv[0] != "p_tuning_v2"))
    assert next(iter(reordered)) == "p_tuning_v2"
    for methods in (dict(registry._METHODS), reordered):
        monkeypatch.setattr(registry, "_METHODS", methods)
        assert get_method("PREFIX_TUNING").name == "prefix_tuning"
        assert get_method("prefix_tuning").name == "prefix_tuning"
        assert get_method("p_tuning_v2").name == "p_tuning_v2"
        config = PeftConfig.from_dict({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4})
        assert type(config).__name__ == "PrefixTuningConfig"
