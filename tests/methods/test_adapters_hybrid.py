"""Hybrids as configs of configs: MAM (prefix + scaled parallel adapter) and UniPELT (gated adapter + prefix + LoRA)."""

from __future__ import annotations

import pytest
import torch

from peftkit import PeftModel, get_peft_model
from peftkit.config import ConfigError, PeftConfig
from peftkit.methods.adapters.hybrid import HybridConfig, MamConfig, UniPeltConfig
from peftkit.methods.prompt.prefix_tuning import PrefixTuningConfig

from ..families import FAMILY, nudge_trainable

torch.set_num_threads(1)
GPT2 = FAMILY["gpt2"]


@pytest.fixture(scope="module")
def roberta_base():
    from transformers import RobertaConfig, RobertaModel

    torch.manual_seed(0)
    return RobertaModel(RobertaConfig())


def test_roberta_base_counts_are_the_sum_of_the_parts(roberta_base):
    d, L = 768, 12
    model = get_peft_model(roberta_base, MamConfig())
    try:  # prefix 30 x 2 L d + parallel adapter 12 x (2 d 512 + 512 + d)
        assert model.get_nb_trainable_parameters()[0] == 30 * 2 * L * d + 9_452_544
    finally:
        model.unload()
    model = get_peft_model(roberta_base, UniPeltConfig())
    try:  # Pfeiffer (r16) + gate, prefix 10, LoRA r8 on q, v + a gate on each
        assert model.get_nb_trainable_parameters()[0] == (
            894_528 + L * (d + 1) + 10 * 2 * L * d + 2 * L * 8 * (d + d) + 2 * L * (d + 1))
    finally:
        model.unload()


def test_mam_with_a_zero_adapter_equals_prefix_tuning_alone():
    parts = {"prefix_tuning": {"num_virtual_tokens": 3}, "parallel_adapter": {"bottleneck_size": 4}}
    mam = get_peft_model(GPT2.model(), MamConfig(parts=parts)).eval()
    prefix = get_peft_model(GPT2.model(), PrefixTuningConfig(num_virtual_tokens=3)).eval()
    wte = mam.get_base_model().transformer.wte.adapters["default"]
    with torch.no_grad():
        prefix.get_base_model().transformer.wte.adapters["default"].embedding.weight.copy_(
            wte.parts["prefix_tuning"].embedding.weight)
        torch.testing.assert_close(GPT2.run(mam), GPT2.run(prefix), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(GPT2.run(mam), GPT2.run(GPT2.model()))  # the prefix acts from the start


def test_unipelt_gates_scale_each_part():
    parts = {"pfeiffer": {"bottleneck_size": 4, "reduction_factor": None}, "lora": {"r": 2}}
    model = get_peft_model(FAMILY["llama"].model(), UniPeltConfig(parts=parts)).eval()
    mlp = model.get_base_model().model.layers[0].mlp
    q = model.get_base_model().model.layers[0].self_attn.q_proj
    x = torch.randn(2, 3, 37)
    with torch.no_grad():
        hyb = mlp.down_proj.adapters["default"]
        h = mlp.down_proj.base_layer(x)
        new = hyb.parts["pfeiffer"](mlp.down_proj.base_layer, x, h.clone())  # parts own their input
        g = torch.sigmoid(hyb.gates["pfeiffer"](h))  # a sequential adapter's gate reads its input, h
        torch.testing.assert_close(mlp.down_proj(x), h + g * (new - h), atol=1e-6, rtol=1e-5)
        lq = q.adapters["default"]
        lq.parts["lora"].lora_B.normal_()
        xq = torch.randn(2, 3, 32)
        hq = q.base_layer(xq)
        newq = lq.parts["lora"](q.base_layer, xq, hq.clone())  # LoRA adds into it in place
        gq = torch.sigmoid(lq.gates["lora"](xq))  # LoRA's gate reads the layer input
        torch.testing.assert_close(q(xq), hq + gq * (newq - hq), atol=1e-6, rtol=1e-5)
    assert model.get_nb_trainable_parameters()[0] == (
        2 * (4 * 33 + 32 * 5 + 33)  # Pfeiffer on down_proj (d = 32) + its gate
        + 2 * (2 * (32 + 32) + 33 + 2 * (32 + 16) + 33))  # LoRA r2 on q (32 -> 32) and v (32 -> 16) + gates


def test_save_load_round_trip_with_prefix(tmp_path):
    parts = {"prefix_tuning": {"num_virtual_tokens": 3},
             "pfeiffer": {"bottleneck_size": 4, "reduction_factor": None}, "lora": {"r": 2}}
    model = get_peft_model(GPT2.model(), UniPeltConfig(parts=parts)).eval()
    nudge_trainable(model, 0.1)
    with torch.no_grad():
        expected = GPT2.run(model)
    model.save_pretrained(tmp_path)
    saved = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(saved, UniPeltConfig) and sorted(saved.parts) == ["lora", "pfeiffer", "prefix_tuning"]
    assert saved.parts["lora"]["r"] == 2 and saved.parts["prefix_tuning"]["num_virtual_tokens"] == 3
    loaded = PeftModel.from_pretrained(GPT2.model(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(GPT2.run(loaded), expected, atol=0, rtol=0)


def test_a_hybrid_without_prefix_runs_on_models_without_a_cache():
    config = MamConfig(parts={"parallel_adapter": {"bottleneck_size": 4}})
    family = FAMILY["vit"]
    base = family.run(family.model())
    torch.testing.assert_close(family.run(get_peft_model(family.model(), config).eval()), base, atol=0, rtol=0)


@pytest.mark.parametrize("parts, message", [
    ({"nonsense": {}}, r"parts: unknown method 'nonsense'"),
    ({"mam": {}}, r"parts\['mam'\]: a hybrid method cannot be a part"),
    ({"vera": {}}, r"parts\['vera'\]: .*with shared state cannot be a part"),
    ({"lora": {"rank": 4}}, r"parts\['lora'\]: .*rank"),
    ({}, r"HybridConfig.parts: expected"),
])
def test_bad_parts_are_config_errors(parts, message):
    with pytest.raises(ConfigError, match=message):
        HybridConfig(parts=parts)
