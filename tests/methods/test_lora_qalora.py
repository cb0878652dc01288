"""QALoRA (``LoraConfig(use_qalora=True, qalora_group_size=g)``) on tiny Llama. peft 0.21.2 builds QALoRA on GPTQ
layers only, so the reference is peft's own ``QALoraLinearVariant`` installed by hand on peft's LoRA layers of a
plain model (its ``init`` and ``forward`` run unchanged): config fields, the pooled file layout, outputs and
gradients, files both ways, the math against peft's formula copied here, merge / unmerge (peft refuses them),
bitsandbytes 4- / 8-bit bases, refused inputs."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.variants import QALoraLinearVariant
from safetensors.torch import load_file

import peftkit
from peftkit import tiny_models
from peftkit.config import ConfigError
from peftkit.methods.lora import qalora
from peftkit.quant import QuantizationErrorWarning, dequantize_weight, quantize_model
from tests.families import FAMILY
from tests.parity import perturb

LLAMA = FAMILY["llama"]
TARGETS = ["q_proj", "v_proj", "o_proj"]  # in_features 32: 4 groups of 8


def _cfg(lib, **kw):
    return lib.LoraConfig(r=4, lora_alpha=8, target_modules=kw.pop("target_modules", TARGETS), use_qalora=True,
                          qalora_group_size=kw.pop("qalora_group_size", 8), **kw)


def _peft_qalora(model, cfg):
    """peft's LoRA model with its QALoRA variant installed on every layer (what ``GPTQLoraLinear`` does)."""
    model = peft.get_peft_model(model, cfg)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            QALoraLinearVariant.init(module, "default", cfg)
            module.lora_variant["default"] = QALoraLinearVariant()
    return model


def _pair(**kw):
    theirs = _peft_qalora(LLAMA.model(), _cfg(peft, **kw))
    perturb(theirs)
    ours = peftkit.get_peft_model(LLAMA.model(), _cfg(peftkit, **kw))
    peftkit.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    return theirs, ours


def peft_formula(x, lora_A_weight, lora_B_weight, scaling, group_size, in_features):
    """peft 0.21.2's ``QALoraLinearVariant.forward`` (dropout off), its lines copied."""
    orig_shape = x.shape
    x_flat = x.view(-1, in_features) if len(orig_shape) > 2 else x
    batch_size, in_features = x_flat.shape
    pooled_features = in_features // group_size
    x_pooled = x_flat.view(batch_size, pooled_features, group_size).mean(dim=2)
    x_pooled_scaled = x_pooled * pooled_features
    delta = x_pooled_scaled @ lora_A_weight.t() @ lora_B_weight.t() * scaling
    if len(orig_shape) > 2:
        delta = delta.view(orig_shape[:-1] + (delta.size(-1),))
    return delta


def test_config_fields_defaults_and_json_round_trip(tmp_path):
    ours, theirs = peftkit.LoraConfig(), peft.LoraConfig()
    assert (ours.use_qalora, ours.qalora_group_size) == (theirs.use_qalora, theirs.qalora_group_size) == (False, 16)
    _cfg(peftkit).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (saved["use_qalora"], saved["qalora_group_size"]) == (True, 8)
    theirs = peft.LoraConfig.from_pretrained(tmp_path)
    assert (theirs.use_qalora, theirs.qalora_group_size) == (True, 8)
    assert peftkit.LoraConfig(qalora_group_size=32).qalora_group_size == 32  # without use_qalora: unused, as peft


def test_file_layout_init_and_trainable_count():
    theirs = _peft_qalora(LLAMA.model(), _cfg(peft))
    ours = peftkit.get_peft_model(LLAMA.model(), _cfg(peftkit))
    ref = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(theirs).items()}
    assert {k: tuple(v.shape) for k, v in peftkit.get_peft_model_state_dict(ours).items()} == ref
    assert ref["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"] == (4, 4)
    # closed form r d_in / g + d_out r: q 32 -> 32, v 32 -> 16, o 32 -> 32, two layers
    assert ours.get_nb_trainable_parameters()[0] == theirs.get_nb_trainable_parameters()[0] == 2 * (
        (16 + 128) + (16 + 64) + (16 + 128))
    layer = ours.get_base_model().model.layers[0].self_attn.q_proj
    assert qalora.QaLoraAdapter.param_count(layer.base_layer, _cfg(peftkit), "model.layers.0.self_attn.q_proj") == 144
    ad = layer.adapters["default"]
    assert not ad.lora_B.any() and 0.05 < ad.lora_A.abs().max() <= 0.5  # nn.Linear(4, 4)'s bound 1 / sqrt(4)
    torch.testing.assert_close(LLAMA.run(ours), LLAMA.run(LLAMA.model()), atol=0, rtol=0)  # identity at init


def test_outputs_and_grads_match_peft():
    theirs, ours = _pair()
    torch.testing.assert_close(LLAMA.run(ours), LLAMA.run(theirs), atol=1e-5, rtol=0)
    theirs.train(), ours.train()
    LLAMA.run(theirs).square().mean().backward()
    LLAMA.run(ours).square().mean().backward()
    ref = {k.replace(".default", ""): p.grad for k, p in theirs.named_parameters() if p.requires_grad}
    got = {n.replace(".adapters.default", "").replace(".lora_A", ".lora_A.weight").replace(
        ".lora_B", ".lora_B.weight"): p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert got.keys() == ref.keys() and len(got) == 12
    for key, grad in got.items():
        torch.testing.assert_close(grad, ref[key], atol=1e-5, rtol=1e-4, msg=key)


def test_layer_equals_peft_formula_and_dense_delta():
    _, ours = _pair(use_rslora=True)  # s = 8 / sqrt(4) = 4
    layer = ours.get_base_model().model.layers[1].self_attn.v_proj
    ad, base = layer.adapters["default"], layer.base_layer
    assert ad.scaling == 4.0
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = base(x) + peft_formula(x, ad.lora_A, ad.lora_B, 4.0, 8, 32)
        torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-6)
        # the dense update: column k of A_dense is (P / g) A[:, k // g], P = 4 groups of g = 8
        a_dense = torch.stack([ad.lora_A[:, k // 8] * (4 / 8) for k in range(32)], dim=1)
        torch.testing.assert_close(ad.delta_weight(base), 4.0 * ad.lora_B @ a_dense, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(x @ ad.delta_weight(base).T, peft_formula(x, ad.lora_A, ad.lora_B, 4.0, 8, 32),
                                   atol=1e-5, rtol=1e-5)


def test_files_load_both_ways(tmp_path):
    theirs, ours = _pair()
    theirs.save_pretrained(tmp_path / "peft")  # peft's file, use_qalora in its config
    loaded = peftkit.PeftModel.from_pretrained(LLAMA.model(), tmp_path / "peft")
    assert loaded.peft_config["default"].use_qalora and loaded.peft_config["default"].qalora_group_size == 8
    expected = LLAMA.run(theirs)
    assert (expected - LLAMA.run(LLAMA.model())).abs().max() > 1e-3
    torch.testing.assert_close(LLAMA.run(loaded), expected, atol=1e-5, rtol=0)

    mine = peftkit.get_peft_model(LLAMA.model(), _cfg(peftkit))
    perturb(mine, seed=7)
    mine.save_pretrained(tmp_path / "peftkit")
    cfg = peft.LoraConfig.from_pretrained(tmp_path / "peftkit")
    back = _peft_qalora(LLAMA.model(), cfg)
    file = load_file(tmp_path / "peftkit" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in file.items()} == {
        k: v.shape for k, v in load_file(tmp_path / "peft" / "adapter_model.safetensors").items()}
    result = peft.set_peft_model_state_dict(back, file)
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "lora_" in k]
    torch.testing.assert_close(LLAMA.run(back), LLAMA.run(mine), atol=1e-5, rtol=0)


def test_merge_unmerge_bit_exact_where_peft_refuses():
    theirs, ours = _pair()
    with pytest.raises(NotImplementedError, match="QALoRA"):
        theirs.merge_adapter()  # peft (GPTQ) cannot merge QALoRA
    model = ours.get_base_model()
    before = {k: v.clone() for k, v in model.state_dict().items() if ".adapters." not in k}
    unmerged = LLAMA.run(ours)
    ours.merge_adapter()
    torch.testing.assert_close(LLAMA.run(ours), unmerged, atol=1e-5, rtol=1e-5)
    layer = model.model.layers[0].self_attn.o_proj
    ad = layer.adapters["default"]
    a_dense = ad.lora_A.repeat_interleave(8, dim=1) * 0.5
    assert torch.equal(layer.base_layer.weight, before["model.layers.0.self_attn.o_proj.base_layer.weight"]
                       + ((ad.lora_B @ a_dense) * 2.0).detach())
    ours.unmerge_adapter()
    after = {k: v for k, v in model.state_dict().items() if ".adapters." not in k}
    assert all(torch.equal(before[k], after[k]) for k in before), "unmerge is not bit-exact"
    merged = ours.merge_and_unload()
    torch.testing.assert_close(LLAMA.run(merged), unmerged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
def test_bitsandbytes_base(bits):
    torch.manual_seed(0)
    model = quantize_model(tiny_models.llama(hidden_size=64, intermediate_size=128).eval(), bits)
    pm = peftkit.get_peft_model(model, _cfg(peftkit, qalora_group_size=16, target_modules=["q_proj", "down_proj"]))
    perturb(pm)
    layer = pm.get_base_model().model.layers[0].mlp.down_proj
    ad, base = layer.adapters["default"], layer.base_layer
    assert ad.lora_A.shape == (4, 8) and ad.lora_A.dtype == torch.float32  # 128 / 16 groups, fp32 beside bnb
    x = torch.randn(2, 3, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), base(x) + peft_formula(x, ad.lora_A, ad.lora_B, 2.0, 16, 128),
                                   atol=1e-5, rtol=1e-5)
    pm.train()
    LLAMA.run(pm).square().mean().backward()
    assert ad.lora_A.grad.abs().sum() > 0 and ad.lora_B.grad.abs().sum() > 0
    pm.eval()
    packed = base.weight.detach().clone()
    exact = dequantize_weight(base) + ad.delta_weight(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", QuantizationErrorWarning)
        layer.merge()
    err = (dequantize_weight(layer.base_layer) - exact).abs().max() / exact.abs().max()
    assert 0 < err < (0.2 if bits == 4 else 0.01)  # re-quantized: close to the exact merge
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight.detach(), packed)  # the original packing comes back exactly


@pytest.mark.parametrize("kwargs,field", [
    ({"qalora_group_size": 0}, "qalora_group_size"),
    ({"qalora_group_size": 8.0}, "qalora_group_size"),
    ({"use_qalora": "yes"}, "use_qalora"),
    ({"use_dora": True}, "use_qalora"),
    ({"alora_invocation_tokens": [1, 2]}, "use_qalora"),
    ({"init_lora_weights": "olora"}, "use_qalora"),
    ({"lora_bias": True}, "use_qalora"),
    ({"fan_in_fan_out": True}, "use_qalora"),
    ({"target_parameters": ["experts.down_proj"]}, "use_qalora"),
])
def test_bad_config_raises_naming_the_field(kwargs, field):
    kwargs.setdefault("use_qalora", True)
    with pytest.raises(ConfigError, match=field):
        peftkit.LoraConfig(**kwargs)


@pytest.mark.parametrize("family,targets,match", [
    ("llama", ["q_proj", "down_proj"],  # down_proj: in_features 37
     r"qalora_group_size: QALoRA on model\.layers\.0\.mlp\.down_proj needs in_features \(37\) divisible by "
     r"qalora_group_size=8; allowed values for it: \[1, 37\]"),
    ("llama", ["q_proj", "embed_tokens"], r"use_qalora: .*embed_tokens is a Embedding"),
    ("gpt2", ["c_attn"], r"use_qalora: .*c_attn is a Conv1D"),
])
def test_unsupported_target_fails_at_get_peft_model_and_leaves_model_untouched(family, targets, match):
    model = FAMILY[family].model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        peftkit.get_peft_model(model, _cfg(peftkit, target_modules=targets))
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not any("adapters" in n for n, _ in model.named_modules())
