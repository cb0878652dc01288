"""``LoraConfig.runtime_config`` (``LoraRuntimeConfig``) as peft 0.21.2: its field and default, never saved (``to_dict``
drops it), dropped from a file that has it; ``ephemeral_gpu_offload`` computes DoRA's initial magnitude on the
accelerator and leaves nothing of the model there."""

from __future__ import annotations

import dataclasses
import json

import peft
import pytest
import torch

import peftkit
from peftkit.config import ConfigError
from peftkit.methods.lora import runtime
from tests.families import FAMILY

LLAMA = FAMILY["llama"]


def test_fields_defaults_and_not_saved(tmp_path):
    ours = {f.name: f.default for f in dataclasses.fields(peftkit.LoraRuntimeConfig)}
    assert ours == {f.name: f.default for f in dataclasses.fields(peft.LoraRuntimeConfig)}
    assert ours == {"ephemeral_gpu_offload": False}
    cfg = peftkit.LoraConfig(runtime_config=peftkit.LoraRuntimeConfig(ephemeral_gpu_offload=True))
    assert cfg.runtime_config.ephemeral_gpu_offload is True
    assert peftkit.LoraConfig().runtime_config == peftkit.LoraRuntimeConfig()
    assert "runtime_config" not in cfg.to_dict() and "runtime_config" in peft.LoraConfig().__dict__
    assert peftkit.LoraConfig(runtime_config=peft.LoraRuntimeConfig(True)).runtime_config.ephemeral_gpu_offload
    cfg.save_pretrained(tmp_path)
    assert "runtime_config" not in json.loads((tmp_path / "adapter_config.json").read_text())
    loaded = peft.LoraConfig.from_pretrained(tmp_path)
    assert loaded.runtime_config == peft.LoraRuntimeConfig()
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    data["runtime_config"] = {"ephemeral_gpu_offload": True}  # a hand-edited file: ignored, with a warning
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="runtime_config"):
        assert peftkit.LoraConfig.from_pretrained(tmp_path).runtime_config == peftkit.LoraRuntimeConfig()


@pytest.mark.parametrize("value", [{"ephemeral_gpu_offload": "yes"}, 3, "cuda"])
def test_bad_values_raise_naming_the_field(value):
    with pytest.raises(ConfigError, match="runtime_config|ephemeral_gpu_offload"):
        peftkit.LoraConfig(runtime_config=value)


def _dora(offload: bool):
    cfg = peftkit.LoraConfig(r=4, target_modules=["q_proj", "down_proj"], use_dora=True, init_lora_weights=False,
                             runtime_config=peftkit.LoraRuntimeConfig(ephemeral_gpu_offload=offload))
    torch.manual_seed(0)
    base = LLAMA.model()
    torch.manual_seed(1)
    return peftkit.get_peft_model(base, cfg)


def test_dora_magnitude_with_offload(monkeypatch):
    """The offload path (its copies and restores) gives the magnitude of the plain path and leaves every tensor where
    it was; the accelerator is the CPU here when the machine has none (on CUDA: the real one)."""
    if not torch.cuda.is_available():
        monkeypatch.setattr(runtime, "_accelerator", lambda: torch.device("cpu"))
    plain, offloaded = _dora(False), _dora(True)
    ref = {k: v for k, v in peftkit.get_peft_model_state_dict(plain).items()}
    got = peftkit.get_peft_model_state_dict(offloaded)
    assert any("magnitude" in k for k in got)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=1e-5)
        assert got[k].device.type == "cpu"
    layer = offloaded.get_base_model().model.layers[0].self_attn.q_proj
    a = layer.adapters["default"]
    assert isinstance(a.lora_A, torch.nn.Parameter) and a.lora_A.requires_grad and a._cache == {}
    assert layer.base_layer.weight.device.type == "cpu" and not layer.base_layer.weight.requires_grad
    torch.testing.assert_close(LLAMA.run(offloaded), LLAMA.run(plain), atol=1e-5, rtol=0)


def test_offload_without_accelerator_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if hasattr(torch, "xpu"):
        monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
    model = LLAMA.model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="ephemeral_gpu_offload"):
        peftkit.get_peft_model(model, peftkit.LoraConfig(
            r=4, target_modules=["q_proj"], use_dora=True,
            runtime_config=peftkit.LoraRuntimeConfig(ephemeral_gpu_offload=True)))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    plain = peftkit.get_peft_model(LLAMA.model(), peftkit.LoraConfig(  # not DoRA: nothing to offload
        r=4, target_modules=["q_proj"], runtime_config=peftkit.LoraRuntimeConfig(ephemeral_gpu_offload=True)))
    assert plain.peft_config["default"].runtime_config.ephemeral_gpu_offload
