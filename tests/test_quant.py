"""Quantized bases (peftkit.quant): 4-bit NF4 / 8-bit bitsandbytes layers under LoRA, DoRA and IA3, the CPU
repack trap, prepare_model_for_kbit_training, merging with re-quantization, LoftQ."""

from __future__ import annotations

import os
import sys
import warnings

import bitsandbytes as bnb
import pytest
import torch
from torch import nn

from peftkit import IA3Config, LoraConfig, get_peft_model
from peftkit.config import ConfigError
from peftkit.layers import adapter_layers
from peftkit.methods.lora import functional as LF
from peftkit.quant import (
    QuantizationErrorWarning, dequantize_weight, guard_cpu_repack, merge_errors,
    prepare_model_for_kbit_training, quantize_model, require_bnb,
)
from peftkit import tiny_models
from tests.families import FAMILY

IDS = torch.randint(0, 99, (2, 7), generator=torch.Generator().manual_seed(3))


def _fp_llama(seed: int = 0) -> nn.Module:
    """Tiny Llama with rows a multiple of 64 wide (bitsandbytes' 4-bit block size; see quantize_model)."""
    torch.manual_seed(seed)
    return tiny_models.llama(hidden_size=64, intermediate_size=128).eval()


def _llama(bits: int = 4) -> nn.Module:
    return quantize_model(_fp_llama(), bits)


def _train(model: nn.Module, steps: int = 8, lr: float = 1e-2) -> list[float]:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _grad_norms(model: nn.Module) -> dict[str, float]:
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    norms = {n: p.grad.abs().sum().item() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return norms


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_model_packs_linears_and_keeps_outputs_close(bits):
    fp = _fp_llama()
    with torch.no_grad():
        ref = fp(input_ids=IDS).logits
    q = quantize_model(_fp_llama(), bits)
    kind = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    linears = [m for n, m in q.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    assert len(linears) == 14 and all(type(m) is kind for m in linears)
    assert type(q.lm_head) is nn.Linear  # kept in full precision, as transformers does
    if bits == 4:
        state = q.model.layers[0].self_attn.q_proj.weight.quant_state
        assert state.quant_type == "nf4" and state.nested  # NF4 with double quantization (QLoRA)
    w = fp.model.layers[0].mlp.up_proj.weight
    deq = dequantize_weight(q.model.layers[0].mlp.up_proj)
    assert deq.shape == w.shape
    tol = 0.2 if bits == 4 else 0.01  # NF4: half the widest code gap (0.14) of each block's absmax
    assert ((deq - w).abs().max() / w.abs().max()).item() < tol
    with torch.no_grad():
        out = q(input_ids=IDS).logits
    assert 0 < (out - ref).abs().max().item() < (0.5 if bits == 4 else 0.05)


@pytest.mark.parametrize("bits", [4, 8])
def test_lora_on_quantized_base_trains_only_adapters(bits):
    model = _llama(bits)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        base_out = model(input_ids=IDS).logits
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    ad = layer.adapters["default"]
    assert ad.lora_A.shape == (4, 64) and ad.lora_B.shape == (64, 4) and ad.lora_A.dtype == torch.float32
    pm.eval()
    with torch.no_grad():
        assert torch.equal(pm(input_ids=IDS).logits, base_out)  # B = 0: identical to the quantized base
    losses = _train(pm)
    assert losses[-1] < losses[0] - 0.05
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters." in n for n in trainable)
    for n, p in pm.base_model.model.named_parameters():  # every packed base weight is untouched
        if ".adapters." not in n:
            key = n.replace(".base_layer", "")
            assert torch.equal(p.detach(), before[key]), n


def test_training_after_eval_inference_still_learns():
    """bitsandbytes 0.50 + AVX512-BF16: an eval, no-grad forward repacks 4-bit weights into a layout whose
    matmul has no backward. A model quantized elsewhere (the repack switch on) must still train."""
    model = _llama(4)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for m in layers:
        m.support_avx512bf16_for_cpu = bnb.functional.has_avx512bf16()  # as bitsandbytes builds it
    model.eval()
    with torch.no_grad():
        model(input_ids=IDS)
    packed = [getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers]
    assert all(packed) == bool(bnb.functional.has_avx512bf16())
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    pm.eval()
    with torch.no_grad():  # inference after wrapping: the guard keeps it from repacking again
        pm(input_ids=IDS)
    pm.train()
    norms = _grad_norms(pm)  # B = 0 at init: only the B factors get gradients on the first step
    assert len(norms) == 28 and min(v for n, v in norms.items() if n.endswith("lora_B")) > 0
    losses = _train(pm)
    norms = _grad_norms(pm)
    assert min(norms.values()) > 0  # A and B of all 14 layers, first layer included
    assert losses[-1] < losses[0] - 0.05


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    model(input_ids=IDS, labels=IDS).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return grads


def test_repack_without_guard_breaks_gradients():
    """The failure the guard prevents (on CPUs where bitsandbytes repacks): after the repack, the base matmul
    has no backward, so gradients only reach earlier layers through the residual stream and come out wrong."""
    pm = get_peft_model(_llama(4), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    _train(pm, steps=1)  # B = 0 at init: one step so every factor has a gradient
    ref = _grads(pm)
    layers = [m for m in pm.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for m in layers:
        m.support_avx512bf16_for_cpu = True
    pm.eval()
    with torch.no_grad():
        pm(input_ids=IDS)
    if not bnb.functional.has_avx512bf16():  # bitsandbytes never repacks on this CPU: nothing to undo
        assert guard_cpu_repack(pm) == 0
        return
    pm.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: "gemv_4bit: an autograd kernel was not registered"
        bad = _grads(pm)
    first_a = "base_model.model.model.layers.0.self_attn.q_proj.adapters.default.lora_A"
    rel = (bad[first_a] - ref[first_a]).norm() / ref[first_a].norm()
    assert rel > 0.05  # the trap: the first layer's gradient is wrong
    assert guard_cpu_repack(pm) == len(layers) == 14
    good = _grads(pm)  # the inverse repack goes through bf16 block scales: close, not bit-exact
    assert max(((good[n] - ref[n]).norm() / ref[n].norm()).item() for n in ref) < 0.02


def test_prepare_model_for_kbit_training():
    model = _llama(4).to(torch.bfloat16)
    prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    assert all(not p.requires_grad for p in model.parameters())
    assert model.model.norm.weight.dtype == torch.float32 and model.lm_head.weight.dtype == torch.float32
    assert model.model.layers[0].input_layernorm.weight.dtype == torch.float32
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    assert model.get_input_embeddings()(IDS).requires_grad
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    losses = _train(pm, steps=6)
    assert losses[-1] < losses[0] - 0.05


@pytest.mark.parametrize("bits", [4, 8])
def test_merge_requantizes_and_reports_error(bits):
    pm = get_peft_model(_llama(bits), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    _train(pm, steps=4)
    pm.eval()
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    packed = layer.base_layer.weight.detach().clone()
    exact = dequantize_weight(layer.base_layer) + layer.adapters["default"].delta_weight(layer.base_layer)
    with torch.no_grad():
        unmerged = pm(input_ids=IDS).logits
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer.merge()
    assert [w.category for w in caught] == [QuantizationErrorWarning]
    err = layer.base_layer.merge_error["default"]
    actual = (dequantize_weight(layer.base_layer) - exact).abs().max().item()
    assert err["max_abs"] == pytest.approx(actual) and 0 < err["rel"] < (0.2 if bits == 4 else 0.01)
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight.detach(), packed)  # the original packing comes back exactly
    with torch.no_grad():
        assert torch.equal(pm(input_ids=IDS).logits, unmerged)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", QuantizationErrorWarning)
        merged = pm.merge_and_unload()
    with torch.no_grad():
        out = merged(input_ids=IDS).logits
    assert 0 < (out - unmerged).abs().max().item() < (0.5 if bits == 4 else 0.05)
    assert len(merge_errors(merged)) == 4


def test_dora_and_ia3_on_4bit_base():
    for config, lr in ((LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"]), 3e-2),
                       (IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]), 0.3)):
        model = _llama(4)
        with torch.no_grad():
            base_out = model(input_ids=IDS).logits
        pm = get_peft_model(model, config)
        pm.eval()
        with torch.no_grad():
            assert (pm(input_ids=IDS).logits - base_out).abs().max().item() < 1e-5  # identity at init
        losses = _train(pm, steps=6, lr=lr)
        assert losses[-1] < losses[0] - 0.02, type(config).__name__
        assert all(p.dtype == torch.float32 for p in pm.parameters() if p.requires_grad)


def test_loftq_init_beats_plain_quantization():
    with pytest.raises(ConfigError, match="loftq_bits"):
        LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 3})
    with pytest.raises(ConfigError, match="only used with"):
        LoraConfig(loftq_config={"loftq_bits": 4})
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    plain = (w - LF.quantize_dequantize(w, 4)).norm()
    errs = []
    for iters in (1, 3):
        A, B, q = LF.loftq_factors(w, 8, 2.0, bits=4, iters=iters)
        assert torch.allclose(LF.quantize_dequantize(q, 4), q, atol=1e-2)  # Q re-quantizes to itself
        errs.append((w - q - 2.0 * B @ A).norm())
    assert errs[0] < 0.9 * plain and errs[1] <= errs[0] * 1.001

    fp = _fp_llama()
    w0 = fp.model.layers[0].self_attn.q_proj.weight.detach().clone()
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="loftq",
                     loftq_config={"loftq_bits": 4, "loftq_iter": 2})
    pm = get_peft_model(fp, cfg)
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    ad = layer.adapters["default"]
    q = layer.base_layer.weight.detach().clone()
    assert not torch.equal(q, w0)
    quantize_model(pm.base_model.model)  # now quantize: the base holds Q, which packs (nearly) exactly
    deq = dequantize_weight(layer.base_layer)
    assert (deq - q).abs().max() < 1e-2
    assert (w0 - deq - ad.delta_weight(layer.base_layer)).norm() < 0.9 * (w0 - LF.quantize_dequantize(w0, 4)).norm()


def test_bad_input_names_the_fix(monkeypatch):
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn\.c_attn \(Conv1D\)"):
        quantize_model(FAMILY["gpt2"].model(), 4)  # Conv1D only (lm_head skipped): nothing to quantize
    with pytest.raises(ValueError, match="4 or 8 bits"):
        quantize_model(_fp_llama(), 3)
    model = nn.Sequential()
    model.add_module("conv1", nn.Conv2d(3, 4, 3))
    model.add_module("fc", nn.Linear(64, 64))
    model.add_module("odd", nn.Linear(37, 64))
    with pytest.warns(UserWarning, match=r"left in full precision.*conv1 \(Conv2d\).*odd \(in_features=37"):
        quantize_model(model, 4)
    assert type(model.fc) is bnb.nn.Linear4bit and type(model.odd) is nn.Linear
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match=r"pip install 'peftkit\[quant\]'"):
        require_bnb()


def test_adapter_layers_count_on_quantized_model():
    pm = get_peft_model(_llama(4), LoraConfig(r=2, target_modules="all-linear"))
    assert len(adapter_layers(pm)) == 14
    trainable, _ = pm.get_nb_trainable_parameters()
    assert trainable == sum(2 * (m.in_features + m.out_features) for _, m in adapter_layers(pm))


def test_recipe_model_quant(monkeypatch):
    from peftkit.train import RecipeError, load_recipe
    from peftkit.train.models import quantize_base

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.chdir(root)
    assert load_recipe("configs/sst2_qlora.yaml").model_quant == "4bit"
    assert load_recipe("configs/sst2_lora.yaml").model_quant == "none"
    with pytest.raises(RecipeError, match="model_quant: expected one of none, 4bit, 8bit"):
        load_recipe("configs/sst2_lora.yaml", ["model_quant=3bit"])
    from transformers import BertConfig, BertForSequenceClassification

    bert = BertForSequenceClassification(BertConfig(vocab_size=99, hidden_size=64, num_hidden_layers=1,
                                                     num_attention_heads=4, intermediate_size=128, num_labels=2))
    quantize_base(bert, "4bit")
    packed = [n for n, m in bert.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(packed) == 7 and type(bert.classifier) is nn.Linear  # q k v o, intermediate, output, pooler
    assert all(not p.requires_grad for p in bert.parameters())
