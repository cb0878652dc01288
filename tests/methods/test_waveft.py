"""WaveFT: config compatibility with Hugging Face PEFT, the wavelet update against PEFT and PyWavelets, the
optional PyWavelets dependency, and bad input."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import numpy as np
import peft
import pytest
import pywt
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftkit
from peftkit.config import ConfigError
from peftkit.methods.waveft import WaveFTAdapter, WaveFTConfig
from peftkit.methods.waveft import functional as WF

from ..families import FAMILY
from ..parity import field_defaults




def test_config_fields_and_defaults_match_peft(tmp_path):
    assert field_defaults(WaveFTConfig) == field_defaults(peft.WaveFTConfig)
    assert WaveFTConfig().peft_type == "WAVEFT"
    from peft.tuners.waveft.constants import WAVELET_REDUCTIONS

    from peftkit.methods.waveft.config import FILTER_LENGTHS

    # the families peft's config accepts, each with the filter length its padding assumes (reduction + 2)
    assert {k: v - 2 for k, v in FILTER_LENGTHS.items()} == {k: r for k, (r, _) in WAVELET_REDUCTIONS.items()}
    peft.WaveFTConfig(n_frequency=30, wavelet_family="sym3", n_frequency_pattern={"q": 5},
                      proportional_parameters=True).save_pretrained(tmp_path / "a")
    loaded = peftkit.PeftConfig.from_pretrained(tmp_path / "a")
    assert isinstance(loaded, WaveFTConfig)
    assert (loaded.n_frequency, loaded.wavelet_family, loaded.n_frequency_pattern) == (30, "sym3", {"q": 5})
    assert loaded.proportional_parameters is True
    WaveFTConfig(scaling=3.5, use_idwt=False, bias="waveft_only", random_loc_seed=9).save_pretrained(tmp_path / "b")
    back = peft.PeftConfig.from_pretrained(tmp_path / "b")
    assert isinstance(back, peft.WaveFTConfig)
    assert (back.scaling, back.use_idwt, back.bias, back.random_loc_seed) == (3.5, False, "waveft_only", 9)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"n_frequency": 0}, "n_frequency"), ({"n_frequency": 2.5}, "n_frequency"), ({"scaling": "big"}, "scaling"),
    ({"wavelet_family": "haar"}, "wavelet_family"), ({"wavelet_family": "db39"}, "wavelet_family"),
    ({"random_loc_seed": None}, "random_loc_seed"), ({"bias": "lora_only"}, "bias"),
    ({"use_idwt": "yes"}, "use_idwt"), ({"proportional_parameters": 1}, "proportional_parameters"),
    ({"n_frequency_pattern": {"q_proj": 0}}, "n_frequency_pattern"),
    ({"target_modules": ".*q_proj", "layers_to_transform": [0]}, "layers_to_transform"),
    ({"layers_pattern": "layers"}, "layers_pattern"),
])
def test_bad_config_values_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=f"WaveFTConfig.{field}"):
        WaveFTConfig(**kwargs)


def _peft_layer(base, **kwargs):
    from peft.tuners.waveft.layer import WaveFTLinear

    cfg = peft.WaveFTConfig(init_weights=False, **kwargs)
    return WaveFTLinear(base, "default", cfg, n_frequency=cfg.n_frequency)


@pytest.mark.parametrize(("family", "idwt", "shape"), [
    ("db1", True, (7, 12)), ("db2", True, (16, 9)), ("sym3", True, (5, 20)), ("db1", False, (7, 12)),
])
def test_positions_and_delta_equal_peft(family, idwt, shape):
    d_out, d_in = shape
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out)
    ref = _peft_layer(base, n_frequency=30, random_loc_seed=5, wavelet_family=family, use_idwt=idwt, scaling=3.0)
    rows, cols = WF.coefficient_positions(d_out, d_in, 30, 5)
    assert torch.equal(torch.stack([rows, cols]), ref.waveft_indices["default"])
    ours = WaveFTAdapter(base, WaveFTConfig(n_frequency=30, random_loc_seed=5, wavelet_family=family,
                                            use_idwt=idwt, scaling=3.0))
    with torch.no_grad():
        ours.waveft_spectrum.copy_(ref.waveft_spectrum["default"])
    torch.testing.assert_close(ours.delta_weight(base), ref.get_delta_weight("default"), atol=1e-6, rtol=0)
    x = torch.randn(3, d_in)
    torch.testing.assert_close(ours(base, x, base(x)), ref(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize(("family", "shape"), [("db1", (6, 10)), ("db2", (9, 14)), ("coif1", (11, 8))])
def test_delta_is_the_inverse_wavelet_transform(family, shape):
    """Against PyWavelets' own idwt2 (float64): the padded coefficient grid, one level, centre-cropped."""
    d_out, d_in = shape
    lo, _ = WF.wavelet_filters(family)
    p_out, p_in = WF.padded_grid(d_out, d_in, len(lo))
    rows, cols = WF.coefficient_positions(d_out, d_in, 25, 3)
    spectrum = torch.randn(25, dtype=torch.float64)
    grid = np.zeros((p_out, p_in))
    grid[rows + (p_out - d_out) // 2, cols + (p_in - d_in) // 2] = spectrum.numpy()
    h, w = p_out // 2, p_in // 2
    full = pywt.idwt2((grid[:h, :w], (grid[:h, w:], grid[h:, :w], grid[h:, w:])), family, mode="zero")
    r0, c0 = (full.shape[0] - d_out) // 2, (full.shape[1] - d_in) // 2
    expected = 2.5 * full[r0:r0 + d_out, c0:c0 + d_in]
    pos, weight = WF.patches(rows, cols, d_out, d_in, (lo, WF.wavelet_filters(family)[1]))
    ours = WF.scatter_delta(spectrum, pos, weight, (d_out, d_in), 2.5)
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-12, rtol=0)
    # Haar: each coefficient spreads over one 2x2 block; longer filters over L x L patches
    assert (ours != 0).sum() <= 25 * len(lo) ** 2


def test_conv1d_delta_in_base_layout_and_fused_path():
    torch.manual_seed(0)
    conv = Conv1D(6, 10)  # weight (10, 6): d_in 10, d_out 6
    lin = nn.Linear(10, 6)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
        lin.bias.copy_(conv.bias)
    cfg = WaveFTConfig(n_frequency=20, wavelet_family="db2", init_weights=False)
    torch.manual_seed(1)
    ours = WaveFTAdapter(conv, cfg)
    torch.manual_seed(1)
    ref = WaveFTAdapter(lin, cfg)
    torch.testing.assert_close(ours.delta_weight(conv), ref.delta_weight(lin).t())
    x = torch.randn(2, 3, 10)
    for adapter, base in ((ours, conv), (ref, lin)):  # W0 + dW in one GEMM == base + delta product, with grads
        fused = adapter.fused_forward(base, x)
        (fused.sum() * 2).backward()
        g_fused = adapter.waveft_spectrum.grad.clone()
        adapter.waveft_spectrum.grad = None
        plain = adapter(base, x, base(x))
        (plain.sum() * 2).backward()
        torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(g_fused, adapter.waveft_spectrum.grad, atol=1e-4, rtol=1e-5)
        adapter.waveft_spectrum.grad = None


def test_proportional_allocation_matches_peft_and_closed_form():
    targets = ["q_proj", "k_proj", "v_proj", "up_proj"]
    kw = {"n_frequency": 50, "proportional_parameters": True, "target_modules": targets}
    theirs = peft.get_peft_model(FAMILY["llama"].model(), peft.WaveFTConfig(**kw))
    ours = peftkit.get_peft_model(FAMILY["llama"].model(), WaveFTConfig(**kw))
    ref = theirs.base_model._proportional_params_cache["default"]
    mine = {path: adapter.n for path, adapter in ours.base_model.adapters("default")}
    assert mine == ref and len(set(mine.values())) > 1  # shares differ with the layer sizes
    config = ours.peft_config["default"]
    closed = sum(WaveFTAdapter.param_count(layer.base_layer, config, path)
                 for path, layer in ours.base_model.adapter_layers())
    assert closed == ours.get_nb_trainable_parameters()[0] == theirs.get_nb_trainable_parameters()[0]


def test_too_many_coefficients_and_unsupported_layers_leave_the_model_untouched():
    model = FAMILY["llama"].model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # llama's k_proj is 32 -> 16: 512 positions
    with pytest.raises(ValueError, match=r"k_proj: WaveFTConfig.n_frequency=600 .* allowed: 1 \.\. 512"):
        peftkit.get_peft_model(model, WaveFTConfig(n_frequency=600, target_modules=["q_proj", "k_proj"]))
    net = nn.Sequential(nn.Linear(4, 4), nn.Conv2d(4, 4, 1))
    with pytest.raises((TypeError, ValueError), match="Conv2d"):
        peftkit.get_peft_model(net, WaveFTConfig(n_frequency=4, target_modules=["0", "1"]))
    for m in (model, net):
        assert not any(isinstance(x, peftkit.AdapterLayer) for x in m.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_missing_pywavelets_is_a_clear_import_error(monkeypatch):
    model = FAMILY["llama"].model()
    monkeypatch.setitem(sys.modules, "pywt", None)  # `import pywt` now raises ImportError
    with pytest.raises(ImportError, match=r"PyWavelets.*pip install \"peftkit\[wavelets\]\""):
        peftkit.get_peft_model(model, WaveFTConfig(n_frequency=8))
    assert not any(isinstance(x, peftkit.AdapterLayer) for x in model.modules())
    WaveFTConfig(n_frequency=8).to_dict()  # configs need no PyWavelets
    sparse = peftkit.get_peft_model(model, WaveFTConfig(n_frequency=8, use_idwt=False))  # no transform, no filters
    assert sparse.get_nb_trainable_parameters()[0] == 8 * 2 * 2  # q_proj and v_proj of two layers


def test_import_peftkit_never_imports_pywavelets():
    """``import pywt`` appears only inside function bodies (the filters are read when an adapter is built)."""
    root = Path(peftkit.__file__).parent
    sources = {path: path.read_text(encoding="utf-8") for path in root.rglob("*.py")}
    users = [path for path, text in sources.items() if "pywt" in text]
    assert root / "methods" / "waveft" / "functional.py" in users
    for path in users:
        tree = ast.parse(sources[path])
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        inside = {id(n) for f in functions for n in ast.walk(f)}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in inside:
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n.split(".")[0] == "pywt" for n in names), f"{path}: module-level import of pywt"
