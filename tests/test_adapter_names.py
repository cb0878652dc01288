"""Adapter names are checked once, when an adapter is added or loaded, before anything is built: a bad name is a
``ValueError`` naming ``adapter_name`` and the rule, the model is left as it was and nothing is written. Accepted
names round-trip through save_pretrained / from_pretrained / load_adapter, each in its own subfolder."""

from __future__ import annotations

import os

import pytest
import torch

from peftkit import LoraConfig, PeftModel, get_peft_model, inject_adapter_in_model

from .families import FAMILY, V

BAD = [
    "", ".", "..", "../x", "../../escape", "/tmp/peftkit-abs-name", "a/b", "a\\b", "c:x", "sft.v2", "\x00",
    "a\x00b", "line\nbreak", "tab\t", "\x7f", "x" * 256, "é" * 128, "__base__", "keys", "training", "_modules",
    None, 3, b"default",
]
GOOD = ["lora_1", "my-adapter", "Adapter 2", "__base", "ünïcode", "x" * 255]


def _cfg() -> LoraConfig:
    return LoraConfig(r=2, init_lora_weights=False, target_modules=["q_proj", "v_proj"])


def _snapshot(model: torch.nn.Module) -> dict:
    """What a refused name must leave as it was: the module objects (by path), the requires_grad flags, the
    parameters' values and the adapters' names."""
    return {
        "modules": {name: id(m) for name, m in model.named_modules()},
        "grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "values": {name: p.detach().clone() for name, p in model.named_parameters()},
        "configs": sorted(getattr(model, "peft_config", {}) or {}),
    }


def _assert_same(model: torch.nn.Module, before: dict) -> None:
    after = _snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["grad"] == before["grad"]
    assert after["configs"] == before["configs"]
    assert after["values"].keys() == before["values"].keys()
    for name, value in before["values"].items():
        assert torch.equal(after["values"][name], value), name


def _files(root) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs}


def _refused(call, name) -> None:
    with pytest.raises(ValueError, match="adapter_name"):
        call()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved LoRA adapter folder (read by the load tests, never written to again)."""
    folder = tmp_path_factory.mktemp("saved")
    get_peft_model(FAMILY["llama"].model(), _cfg()).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name", BAD, ids=lambda v: repr(v)[:24])
def test_get_peft_model_refuses(name, tmp_path):
    base = FAMILY["llama"].model()
    before = _snapshot(base)
    _refused(lambda: get_peft_model(base, _cfg(), adapter_name=name), name)
    _assert_same(base, before)
    assert not hasattr(base, "peft_config")


@pytest.mark.parametrize("name", BAD, ids=lambda v: repr(v)[:24])
def test_add_adapter_refuses(name, tmp_path):
    model = get_peft_model(FAMILY["llama"].model(), _cfg())
    before = _snapshot(model)
    _refused(lambda: model.add_adapter(name, _cfg()), name)
    _assert_same(model, before)
    # the model still saves what it saved before, and only that
    model.save_pretrained(tmp_path)
    assert {f for f in _files(tmp_path) if f != "README.md"} == {"adapter_config.json", "adapter_model.safetensors"}


@pytest.mark.parametrize("name", BAD, ids=lambda v: repr(v)[:24])
def test_load_adapter_and_from_pretrained_refuse(name, saved, tmp_path):
    listing = _files(saved)
    model = get_peft_model(FAMILY["llama"].model(), _cfg())
    before = _snapshot(model)
    _refused(lambda: model.load_adapter(saved, adapter_name=name), name)
    _assert_same(model, before)
    base = FAMILY["llama"].model()
    before = _snapshot(base)
    _refused(lambda: PeftModel.from_pretrained(base, saved, adapter_name=name), name)
    _assert_same(base, before)
    assert _files(saved) == listing
    assert not os.path.exists("/tmp/peftkit-abs-name")


@pytest.mark.parametrize("name", ["", "..", "/tmp/peftkit-abs-name", "sft.v2", "__base__", "\x00"], ids=repr)
def test_inject_adapter_in_model_refuses(name):
    base = FAMILY["llama"].model()
    before = _snapshot(base)
    _refused(lambda: inject_adapter_in_model(_cfg(), base, adapter_name=name), name)
    _assert_same(base, before)


def test_the_message_names_the_rule():
    model = get_peft_model(FAMILY["llama"].model(), _cfg())
    with pytest.raises(ValueError, match=r"adapter_name '\.\./x'.*'/'") as info:
        model.add_adapter("../x", _cfg())
    assert "255" in str(info.value)
    with pytest.raises(ValueError, match=r"adapter_name '__base__'.*reserved"):
        model.add_adapter("__base__", _cfg())
    with pytest.raises(ValueError, match=r"adapter_name 'keys'.*nn\.ModuleDict"):
        model.add_adapter("keys", _cfg())


def test_accepted_names_round_trip(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(FAMILY["llama"].model(), _cfg())
    for i, name in enumerate(GOOD):
        cfg = _cfg()
        cfg.r = 2 + i % 3
        model.add_adapter(name, cfg)
    model.eval()
    ids = torch.randint(0, V, (2, 5))
    expected = {}
    with torch.no_grad():
        for name in ["default", *GOOD]:
            model.set_adapter(name)
            expected[name] = model(input_ids=ids).logits
    assert len({round(v.sum().item(), 4) for v in expected.values()}) == len(expected)  # all differ
    out = tmp_path / "out"
    model.save_pretrained(out)
    # "default" in the folder itself, every other adapter in the subfolder of its name, nothing else anywhere
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert {f for f in _files(out) if not f.endswith("README.md")} == {
        "adapter_config.json", "adapter_model.safetensors",
        *(f"{n}/{f}" for n in GOOD for f in ("adapter_config.json", "adapter_model.safetensors"))}
    with torch.no_grad():
        for name in GOOD[:3]:
            loaded = PeftModel.from_pretrained(FAMILY["llama"].model(), out / name, adapter_name=name)
            assert list(loaded.peft_config) == [name]
            torch.testing.assert_close(loaded(input_ids=ids).logits, expected[name], atol=1e-6, rtol=0)
        loaded = PeftModel.from_pretrained(FAMILY["llama"].model(), out)
        for name in GOOD[3:]:
            loaded.load_adapter(out / name, adapter_name=name)
            loaded.set_adapter(name)
            torch.testing.assert_close(loaded(input_ids=ids).logits, expected[name], atol=1e-6, rtol=0)
        loaded.set_adapter("default")
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected["default"], atol=1e-6, rtol=0)
