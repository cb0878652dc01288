"""C3A: config compatibility with Hugging Face PEFT, the block-circulant math against explicit matrices, both
forward routes against peft's layer, block sizes that do not fit, and targets."""

from __future__ import annotations

import copy
import dataclasses

import peft
import pytest
import torch
from peft.tuners.c3a.utils import get_circulant_fast
from peft.utils import constants as peft_constants
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftkit
from peftkit.config import ConfigError
from peftkit.methods.c3a import C3AAdapter, C3AConfig
from peftkit.methods.c3a import functional as CF
from peftkit.targeting import default_target_names

from ..families import FAMILY


def _defaults(cls):
    return {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
            for f in dataclasses.fields(cls)}


def test_config_fields_and_defaults_match_peft(tmp_path):
    assert _defaults(C3AConfig) == _defaults(peft.C3AConfig)
    peft.C3AConfig(block_size=8, block_size_pattern={"v_proj": 4}, init_weights="gaussian").save_pretrained(tmp_path / "a")
    loaded = peftkit.PeftConfig.from_pretrained(tmp_path / "a")
    assert isinstance(loaded, C3AConfig) and loaded.block_size == 8 and loaded.block_size_pattern == {"v_proj": 4}
    assert loaded.init_weights == "gaussian"
    C3AConfig(block_size=16, bias="c3a_only", init_weights=True).save_pretrained(tmp_path / "b")
    back = peft.PeftConfig.from_pretrained(tmp_path / "b")
    assert isinstance(back, peft.C3AConfig) and back.block_size == 16 and back.bias == "c3a_only"
    assert back.init_weights is True


@pytest.mark.parametrize("bad", [{"block_size": 0}, {"block_size": 2.5}, {"bias": "lora_only"},
                                 {"block_size_pattern": {"q": 0}}, {"init_weights": "orthogonal"},
                                 {"target_modules": ".*q", "layers_to_transform": [0]}])
def test_bad_config_values(bad):
    with pytest.raises(ConfigError):
        C3AConfig(**bad)


def _explicit(kernel: torch.Tensor) -> torch.Tensor:
    """The block-circulant matrix written out: block (i, j), row s = kernel[i, j] rolled right by s."""
    m, n, b = kernel.shape
    out = torch.zeros(m * b, n * b, dtype=kernel.dtype)
    for i in range(m):
        for j in range(n):
            for s in range(b):
                out[i * b + s, j * b:(j + 1) * b] = torch.roll(kernel[i, j], s)
    return out


@pytest.mark.parametrize("shape", [(2, 3, 4), (1, 2, 5), (3, 1, 1), (2, 2, 8)])
def test_delta_and_fft_product_against_explicit_circulant(shape):
    torch.manual_seed(0)
    m, n, b = shape
    kernel = torch.randn(shape, dtype=torch.float64)
    dense = _explicit(kernel) / (n * b)
    assert torch.equal(CF.c3a_delta(kernel, n * b), dense)  # gathering: exact
    torch.testing.assert_close(get_circulant_fast(kernel) / (n * b), dense)  # peft's layout and scale
    x = torch.randn(4, 3, n * b, dtype=torch.float64)
    torch.testing.assert_close(CF.c3a_apply(x, kernel, n * b), x @ dense.t(), atol=1e-12, rtol=1e-12)
    xr, kr = x.clone().requires_grad_(True), kernel.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, w: CF.c3a_apply(a, w, n * b), (xr[:2, :1], kr))


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("conv1d", [False, True])
def test_both_routes_match_peft_layer(monkeypatch, dense, conv1d):
    """Output and kernel gradient equal peft's C3ALinear (the dense GEMM route and the FFT route), also on
    Conv1D; the input gradient is ``g (W0 + dW)``, which peft 0.21.2's ``BlockCircularConvolution`` gets wrong
    (it returns another circulant product: a deliberate difference)."""
    monkeypatch.setattr(CF, "dense_is_cheaper", lambda *a, **k: dense)
    torch.manual_seed(0)
    lin = nn.Linear(24, 16)
    ref = peft.get_peft_model(nn.Sequential(copy.deepcopy(lin)), peft.C3AConfig(block_size=8, target_modules=["0"]))
    base = lin
    if conv1d:
        base = Conv1D(16, 24)
        with torch.no_grad():
            base.weight.copy_(lin.weight.t())
            base.bias.copy_(lin.bias)
    ours = peftkit.get_peft_model(nn.Sequential(base), C3AConfig(block_size=8, target_modules=["0"]))
    with torch.no_grad():
        ours.base_model.model[0].adapters["default"].c3a_kernel.copy_(ref.base_model.model[0].c3a_kernel["default"])
    x = torch.randn(3, 5, 24)
    outs = []
    for model in (ref, ours):
        xi = x.clone().requires_grad_(True)
        y = model(xi)
        (y * torch.linspace(-1, 1, 16)).sum().backward()
        kernel = [p for n, p in model.named_parameters() if p.requires_grad][0]
        outs.append((y.detach(), xi.grad, kernel.grad))
    (y_ref, gx_ref, gk_ref), (y, gx, gk) = outs
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gk, gk_ref, atol=1e-5, rtol=1e-5)
    kernel = ours.base_model.model[0].adapters["default"].c3a_kernel.detach()
    weight = lin.weight.detach() + _explicit(kernel) / 24
    expected = (torch.linspace(-1, 1, 16).expand(3, 5, 16)) @ weight
    torch.testing.assert_close(gx, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(gx_ref, expected, atol=1e-3)  # peft's input gradient (see the docstring)


def test_cost_model_picks_fft_on_wide_layers_and_dense_on_narrow():
    assert not CF.dense_is_cheaper(4096, 4096, 4096, 256, training=True)
    assert not CF.dense_is_cheaper(1, 4096, 4096, 256, training=False)  # decoding: no d_out x d_in build
    assert CF.dense_is_cheaper(1024, 384, 384, 4, training=True)
    assert CF.dense_is_cheaper(1024, 384, 384, 128, training=False)


def test_block_size_that_does_not_divide_is_refused_model_untouched():
    model = FAMILY["llama"].model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # q_proj is 32 -> 32, v_proj 32 -> 16: 32 divides q_proj only
    with pytest.raises(ConfigError, match=r"C3AConfig\.block_size: 32 .*v_proj.*in 32, out 16.*\[1, 2, 4, 8, 16\]"):
        peftkit.get_peft_model(model, C3AConfig(block_size=32))
    assert not any(isinstance(m, peftkit.AdapterLayer) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError):  # peft refuses it too
        peft.get_peft_model(FAMILY["llama"].model(), peft.C3AConfig(block_size=32))
    # block_size_pattern fixes it per module (peft's rule: ".*\.<key>$"), and is named when it is the culprit
    ours = peftkit.get_peft_model(FAMILY["llama"].model(), C3AConfig(block_size=32, block_size_pattern={"v_proj": 16}))
    kernels = {p: layer.adapters["default"].c3a_kernel.shape for p, layer in ours.base_model.adapter_layers()}
    assert kernels["model.layers.0.self_attn.q_proj"] == (1, 1, 32)
    assert kernels["model.layers.0.self_attn.v_proj"] == (1, 2, 16)
    assert ours.get_nb_trainable_parameters()[0] == 2 * (32 * 32 // 32 + 32 * 16 // 16)
    with pytest.raises(ConfigError, match=r"block_size_pattern\['v_proj'\]: 3 .*allowed"):
        peftkit.get_peft_model(FAMILY["llama"].model(), C3AConfig(block_size=8, block_size_pattern={"v_proj": 3}))


def test_default_targets_are_peft_c3a_table():
    table = peft_constants.TRANSFORMERS_MODELS_TO_C3A_TARGET_MODULES_MAPPING
    for model_type, ref in table.items():
        ours = default_target_names(model_type, "c3a")
        if model_type == "btlm":  # peft: "c_proj" (attention and FFN output) and "c_attn"
            assert set(ours) == {"c_attn", "attn.c_proj", "mlp.c_proj"}
            continue
        assert (ours == ref) if isinstance(ref, str) else sorted(ours) == sorted(ref), model_type


def test_merge_adds_the_dense_delta_in_base_layout():
    torch.manual_seed(0)
    conv = Conv1D(8, 12)  # weight (12, 8): d_in 12, d_out 8
    ad = C3AAdapter(conv, C3AConfig(block_size=4))
    assert ad.c3a_kernel.shape == (2, 3, 4) and C3AAdapter.param_count(conv, C3AConfig(block_size=4)) == 24
    torch.testing.assert_close(ad.delta_weight(conv), (_explicit(ad.c3a_kernel.detach()) / 12).t())
    # xavier-uniform init as peft: U(-a, a), a = sqrt(6 / (d_in + d_out))
    assert ad.c3a_kernel.abs().max() <= (6 / 20) ** 0.5 and ad.c3a_kernel.abs().max() > 0.3


def test_half_precision_base_keeps_fp32_kernel_and_matches_peft():
    torch.manual_seed(0)
    lin = nn.Linear(16, 16).to(torch.bfloat16)
    ref = peft.get_peft_model(nn.Sequential(copy.deepcopy(lin)), peft.C3AConfig(block_size=8, target_modules=["0"]))
    ours = peftkit.get_peft_model(nn.Sequential(lin), C3AConfig(block_size=8, target_modules=["0"]))
    kernel = ours.base_model.model[0].adapters["default"].c3a_kernel
    assert kernel.dtype == torch.float32
    with torch.no_grad():
        kernel.copy_(ref.base_model.model[0].c3a_kernel["default"].float())
    x = torch.randn(2, 3, 16, dtype=torch.bfloat16)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-2, rtol=0)
