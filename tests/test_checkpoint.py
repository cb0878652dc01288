"""Adapter files: atomic saves, safe loads, and errors that name the file / key and change nothing."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import peftkit
from peftkit import AdapterLayer, LoraConfig, PeftModel, get_peft_model
from peftkit.checkpoint import CheckpointError

from .families import FAMILY

FAMILY_NAME = "llama"


class Payload:
    """An arbitrary pickled object: loading must refuse it rather than run its reconstruction."""


@pytest.fixture
def family():
    return FAMILY[FAMILY_NAME]


@pytest.fixture
def saved(family, tmp_path):
    model = get_peft_model(family.model(), LoraConfig(r=4, init_lora_weights=False))
    model.save_pretrained(tmp_path)
    return tmp_path, family.run(model)


def snapshot(model):
    return (
        [type(m).__name__ for m in model.modules()],
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
    )


def assert_unchanged(model, snap):
    types, state, flags = snapshot(model)
    assert types == snap[0]
    assert state.keys() == snap[1].keys()
    assert all(torch.equal(state[k], snap[1][k]) for k in state)
    assert flags == snap[2]


def test_files_and_keys_follow_peft_layout(saved):
    folder, _ = saved
    assert sorted(os.listdir(folder)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["inference_mode"] is True
    keys = set(load_file(folder / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight" in keys
    assert len(keys) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)


def test_round_trip_restores_outputs_exactly(family, saved):
    folder, expected = saved
    loaded = PeftModel.from_pretrained(family.model(), folder)
    torch.testing.assert_close(family.run(loaded), expected, atol=0, rtol=0)
    assert not any(p.requires_grad for p in loaded.parameters())  # inference by default
    trainable = PeftModel.from_pretrained(family.model(), folder, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == 2 * 4 * ((32 + 32) + (32 + 16))  # v_proj: 2 kv heads x 8


def test_legacy_bin_loads_with_weights_only(family, saved):
    folder, expected = saved
    state = load_file(folder / "adapter_model.safetensors")
    os.remove(folder / "adapter_model.safetensors")
    torch.save(state, folder / "adapter_model.bin")
    loaded = PeftModel.from_pretrained(family.model(), folder)
    torch.testing.assert_close(family.run(loaded), expected, atol=0, rtol=0)


def test_legacy_bin_with_arbitrary_objects_is_refused(family, saved):
    folder, _ = saved
    os.remove(folder / "adapter_model.safetensors")
    torch.save({"x": torch.zeros(1), "evil": Payload()}, folder / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="adapter_model.bin"):
        PeftModel.from_pretrained(family.model(), folder)


def test_corrupt_safetensors_names_the_file(family, saved):
    folder, _ = saved
    (folder / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    base = family.model()
    snap = snapshot(base)
    with pytest.raises(CheckpointError, match="adapter_model.safetensors"):
        PeftModel.from_pretrained(base, folder)
    assert_unchanged(base, snap)


def test_truncated_safetensors_names_the_file(family, saved):
    folder, _ = saved
    path = folder / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="adapter_model.safetensors"):
        PeftModel.from_pretrained(family.model(), folder)


def test_missing_config_names_the_file(family, saved):
    folder, _ = saved
    os.remove(folder / "adapter_config.json")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        PeftModel.from_pretrained(family.model(), folder)


def test_missing_weights_names_the_folder(family, saved):
    folder, _ = saved
    os.remove(folder / "adapter_model.safetensors")
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        PeftModel.from_pretrained(family.model(), folder)


def test_shape_mismatch_names_key_and_shapes_and_changes_nothing(family, saved):
    folder, _ = saved
    config = json.loads((folder / "adapter_config.json").read_text())
    config["r"] = 8
    (folder / "adapter_config.json").write_text(json.dumps(config))
    base = family.model()
    snap = snapshot(base)
    with pytest.raises(CheckpointError) as err:
        PeftModel.from_pretrained(base, folder)
    msg = str(err.value)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in msg
    assert "(4, 32)" in msg and "(8, 32)" in msg
    assert_unchanged(base, snap)


def test_unknown_key_is_named_and_changes_nothing(family, saved):
    folder, _ = saved
    path = folder / "adapter_model.safetensors"
    state = load_file(path)
    state["base_model.model.model.layers.0.self_attn.nope.lora_A.weight"] = torch.zeros(4, 32)
    save_file(state, path)
    base = family.model()
    snap = snapshot(base)
    with pytest.raises(CheckpointError, match="nope.lora_A.weight"):
        PeftModel.from_pretrained(base, folder)
    assert_unchanged(base, snap)


def test_missing_key_is_named(family, saved):
    folder, _ = saved
    path = folder / "adapter_model.safetensors"
    state = load_file(path)
    del state["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    save_file(state, path)
    with pytest.raises(CheckpointError, match="layers.1.self_attn.v_proj.lora_B.weight"):
        PeftModel.from_pretrained(family.model(), folder)


def test_failed_load_adapter_leaves_the_peft_model_as_it_was(family, saved, tmp_path):
    folder, _ = saved
    model = get_peft_model(family.model(), LoraConfig(r=2, target_modules=["q_proj", "k_proj"]))
    model.add_adapter("extra", LoraConfig(r=2, target_modules=["k_proj"]))
    before = family.run(model)
    snap = snapshot(model)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["r"] = 3
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError):
        model.load_adapter(folder, adapter_name="broken")
    assert set(model.peft_config) == {"default", "extra"}
    assert_unchanged(model, snap)
    torch.testing.assert_close(family.run(model), before, atol=0, rtol=0)


def test_save_is_atomic_when_writing_crashes(family, saved, monkeypatch):
    folder, _ = saved
    before = (folder / "adapter_model.safetensors").read_bytes()
    model = get_peft_model(family.model(), LoraConfig(r=4))

    def crash(tensors, path, metadata=None):
        with open(path, "wb") as fh:
            fh.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(peftkit.checkpoint, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(folder)
    assert (folder / "adapter_model.safetensors").read_bytes() == before
    assert sorted(os.listdir(folder)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def test_unknown_config_keys_warn_and_load(family, saved):
    folder, expected = saved
    config = json.loads((folder / "adapter_config.json").read_text())
    config["from_the_future"] = 1
    del config["lora_dropout"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="from_the_future"):
        loaded = PeftModel.from_pretrained(family.model(), folder)
    assert loaded.peft_config["default"].lora_dropout == 0.0
    torch.testing.assert_close(family.run(loaded), expected, atol=0, rtol=0)


def test_load_rollback_restores_plain_modules(family, saved):
    folder, _ = saved
    (folder / "adapter_model.safetensors").write_bytes(b"junk")
    base = family.model()
    with pytest.raises(CheckpointError):
        PeftModel.from_pretrained(base, folder)
    assert not any(isinstance(m, AdapterLayer) for m in base.modules())


def test_loading_builds_adapters_on_meta_and_adopts_the_file_tensors(family, saved, monkeypatch):
    """Adapters start on the meta device (nothing allocated, no init) and are materialized once from the
    file: aligned memory of their own, equal to the file's values."""
    import peftkit.checkpoint as ckpt
    import peftkit.model as pm_module

    folder, expected = saved
    read = {}
    real_read = ckpt.read_weights

    def spy(path):
        state, source = real_read(path)
        read.update(state)
        return state, source

    monkeypatch.setattr(pm_module.ckpt, "read_weights", spy)
    made_on_meta = []
    real_build = peftkit.tuner._build

    def build(cls, base, config, path, init, meta, extra):
        adapter = real_build(cls, base, config, path, init, meta, extra)
        made_on_meta.append(meta and hasattr(adapter, "load_device"))
        return adapter

    monkeypatch.setattr(peftkit.tuner, "_build", build)
    model = PeftModel.from_pretrained(family.model(), folder)
    assert made_on_meta and all(made_on_meta)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    loaded = layer.adapters["default"].lora_A
    assert torch.equal(loaded, read[key]) and loaded.data_ptr() != read[key].data_ptr()
    assert loaded.data_ptr() % 64 == 0
    assert not any(p.is_meta for p in model.parameters())
    torch.testing.assert_close(family.run(model), expected, rtol=0, atol=0)
