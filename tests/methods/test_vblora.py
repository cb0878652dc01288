"""VB-LoRA: config as PEFT's, the factors' math, the shared trained bank, bad widths, the top-k file form."""

from __future__ import annotations

import dataclasses

import peft
import pytest
import torch

import peftkit
from peftkit.config import ConfigError
from peftkit.methods.vblora import VBLoRAConfig
from peftkit.methods.vblora import functional as VF

from ..families import FAMILY, untouched


def test_config_fields_and_defaults_match_peft(tmp_path):
    assert {f.name for f in dataclasses.fields(VBLoRAConfig)} == {f.name for f in dataclasses.fields(peft.VBLoRAConfig)}
    a, b = VBLoRAConfig(), peft.VBLoRAConfig()
    for f in dataclasses.fields(VBLoRAConfig):
        if f.name not in ("peft_type", "peft_version"):
            assert getattr(a, f.name) == getattr(b, f.name), f.name
    VBLoRAConfig(r=3, num_vectors=40, vector_length=16, save_only_topk_weights=True).save_pretrained(tmp_path)
    ref = peft.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(ref, peft.VBLoRAConfig) and (ref.r, ref.num_vectors, ref.vector_length) == (3, 40, 16)
    assert isinstance(peftkit.PeftConfig.from_pretrained(tmp_path), VBLoRAConfig)


@pytest.mark.parametrize(("kwargs", "field"), [({"r": 0}, "r"), ({"topk": 5, "num_vectors": 4}, "topk"),
                                               ({"vector_length": 0}, "vector_length"), ({"bias": "lora_only"}, "bias"),
                                               ({"vblora_dropout": 1.0}, "vblora_dropout")])
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=rf"VBLoRAConfig\.{field}: expected"):
        VBLoRAConfig(**kwargs)


def test_factors_are_topk_mixtures_of_the_bank():
    torch.manual_seed(0)
    bank, la, lb = torch.randn(6, 4), torch.randn(3, 2, 6), torch.randn(5, 3, 6)
    a, b = VF.vblora_factors(la, lb, bank, 2)
    assert a.shape == (3, 8) and b.shape == (20, 3)
    top, idx = la[1, 1].topk(2)
    w = top.softmax(-1)
    torch.testing.assert_close(a[1, 4:8], w[0] * bank[idx[0]] + w[1] * bank[idx[1]])
    top, idx = lb[2, 1].topk(2)  # B's column 1, rows 8..11: the third output tile
    w = top.softmax(-1)
    torch.testing.assert_close(b[8:12, 1], w[0] * bank[idx[0]] + w[1] * bank[idx[1]])
    indices, weights = VF.logits_to_topk(la, 2, 6)
    assert indices.dtype == torch.uint8 and weights.shape == (3, 2, 1)
    a2, _ = VF.vblora_factors(VF.topk_to_logits(indices, weights, 6), lb, bank, 2)
    torch.testing.assert_close(a2, a)


def test_one_trained_bank_per_adapter():
    model = peftkit.get_peft_model(FAMILY["llama"].model(), VBLoRAConfig(r=2, num_vectors=8, vector_length=8))
    model.add_adapter("other", VBLoRAConfig(r=2, num_vectors=8, vector_length=8))
    banks = {n: model.base_model.shared_state[n].vblora_vector_bank for n in ("default", "other")}
    assert banks["default"] is not banks["other"]
    assert banks["default"].requires_grad and not banks["other"].requires_grad
    names = [n for n, p in model.named_parameters() if p is banks["default"]]
    assert len(names) == 1  # counted once
    FAMILY["llama"].run(model).pow(2).mean().backward()
    assert banks["default"].grad is not None and banks["default"].grad.abs().sum() > 0


def test_a_width_the_vector_length_does_not_divide_is_refused_and_the_model_untouched():
    base = FAMILY["llama"].model()
    with untouched(base), pytest.raises(ConfigError, match=r"VBLoRAConfig\.vector_length: 12 .*q_proj \(d_in=32, d_out=32\).*\[1, 2, 4, 8, 16\]"):
        peftkit.get_peft_model(base, VBLoRAConfig(vector_length=12, num_vectors=8))


def test_topk_file_is_for_inference(tmp_path):
    family = FAMILY["llama"]
    cfg = VBLoRAConfig(r=2, num_vectors=8, vector_length=8, save_only_topk_weights=True)
    model = peftkit.get_peft_model(family.model(), cfg)
    expected = family.run(model)
    model.save_pretrained(tmp_path)
    loaded = peftkit.PeftModel.from_pretrained(family.model(), tmp_path)
    torch.testing.assert_close(family.run(loaded), expected, atol=1e-6, rtol=0)
    layer = next(layer for _, layer in loaded.base_model.adapter_layers())
    assert layer.adapters["default"].vblora_logits_A.isinf().any()
    loaded.train()
    with pytest.raises(RuntimeError, match="save_only_topk_weights"):
        family.run(loaded)
