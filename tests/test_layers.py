"""The shared wrapper layer: exact unmerge, safe merge, several active adapters, every base layer type."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit.methods.lora import fast as lora_fast
from peftkit import AdapterLayer, LoraConfig
from peftkit.methods.lora import LoraAdapter


def wrap(base, name="default", **kwargs):
    torch.manual_seed(0)
    layer = AdapterLayer(base)
    layer.add(name, LoraAdapter(base, LoraConfig(**{"r": 3, "init_lora_weights": False, **kwargs})))
    layer.set_active([name])
    return layer


BASES = {
    "linear": (lambda: nn.Linear(12, 10), lambda: torch.randn(4, 5, 12)),
    "conv1d_gpt2": (lambda: Conv1D(10, 12), lambda: torch.randn(4, 5, 12)),
    "embedding": (lambda: nn.Embedding(20, 10, padding_idx=0), lambda: torch.randint(0, 20, (4, 5))),
    "conv1d": (lambda: nn.Conv1d(6, 8, 3, padding=1), lambda: torch.randn(2, 6, 9)),
    "conv2d": (lambda: nn.Conv2d(6, 8, 3, stride=2), lambda: torch.randn(2, 6, 9, 9)),
}


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("kind", BASES)
def test_every_base_layer_type_merges_and_unmerges_exactly(kind, dora):
    make_base, make_x = BASES[kind]
    torch.manual_seed(1)
    base = make_base()
    w0 = base.weight.detach().clone()
    layer = wrap(base, use_dora=dora)
    x = make_x()
    with torch.no_grad():
        unmerged = layer(x)
        assert not torch.allclose(unmerged, base(x))
        layer.merge()
        torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)
        layer.unmerge()
    assert torch.equal(base.weight, w0)


def test_unmerge_is_exact_where_float_round_trip_is_not():
    base = nn.Linear(64, 64)
    layer = wrap(base, lora_alpha=64)  # a large delta: (W + d) - d != W in many entries
    w0 = base.weight.detach().clone()
    delta = layer.adapters["default"].delta_weight(base).detach()
    naive = (w0 + delta) - delta
    assert not torch.equal(naive, w0), "the test needs a delta whose float round trip is lossy"
    layer.merge()
    layer.unmerge()
    assert torch.equal(base.weight, w0)


def test_two_adapters_active_add_up_and_unmerge_in_reverse():
    base = nn.Linear(8, 8)
    layer = wrap(base, "a")
    layer.add("b", LoraAdapter(base, LoraConfig(r=2, init_lora_weights=False)))
    x = torch.randn(3, 8)
    w0 = base.weight.detach().clone()
    with torch.no_grad():
        da = layer.adapters["a"].delta_weight(base)
        db = layer.adapters["b"].delta_weight(base)
        layer.set_active(["a", "b"])
        both = layer(x)
        torch.testing.assert_close(both, x @ (w0 + da + db).t() + base.bias, atol=1e-5, rtol=1e-5)
        layer.merge()
        assert layer.merged_adapters == ["a", "b"]
        torch.testing.assert_close(layer(x), both, atol=1e-5, rtol=1e-5)
        with pytest.raises(RuntimeError, match="reverse"):
            layer.unmerge(["a"])
        layer.unmerge()
    assert torch.equal(base.weight, w0)


def test_safe_merge_refuses_nan_and_changes_nothing():
    base = nn.Linear(8, 8)
    layer = wrap(base)
    with torch.no_grad():
        layer.adapters["default"].lora_B[0, 0] = float("nan")
    w0 = base.weight.detach().clone()
    with pytest.raises(ValueError, match="NaN"):
        layer.merge(safe_merge=True)
    assert torch.equal(base.weight, w0) and layer.merged_adapters == []


def test_merging_twice_warns_and_disabling_unmerges():
    base = nn.Linear(8, 8)
    layer = wrap(base)
    x = torch.randn(2, 8)
    with torch.no_grad():
        expected_base = base(x)
        layer.merge()
        with pytest.warns(UserWarning, match="already merged"):
            layer.merge()
        layer.disable_adapters = True
        torch.testing.assert_close(layer(x), expected_base, atol=0, rtol=0)
        assert layer.merged_adapters == []


def test_attribute_reads_fall_through_to_the_base_layer():
    base = nn.Linear(8, 6)
    layer = wrap(base)
    assert layer.in_features == 8 and layer.out_features == 6 and layer.weight is base.weight


def test_low_precision_base_keeps_fp32_adapters():
    base = nn.Linear(8, 8).to(torch.bfloat16)
    layer = wrap(base)
    adapter = layer.adapters["default"]
    assert adapter.lora_A.dtype == torch.float32
    out = layer(torch.randn(2, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("kind", ["linear", "conv1d_gpt2"])
def test_fused_paths_equal_the_merged_formula(kind, dora, monkeypatch):
    make_base, _ = BASES[kind]
    base = make_base()
    layer = wrap(base, use_dora=dora).eval()
    adapter = layer.adapters["default"]
    merged_calls = []
    original = lora_fast.merged_weight_forward
    monkeypatch.setattr(lora_fast, "merged_weight_forward",
                        lambda *a: merged_calls.append(1) or original(*a))
    with torch.no_grad():
        w, _ = adapter.merge(base, base.weight.detach().clone())
        w = w.t() if kind == "conv1d_gpt2" else w
    many, few = torch.randn(3, 20, 12), torch.randn(1, 2, 12)  # 60 tokens > break-even 12*10/22, 2 < it
    for x, weight_path in ((many, True), (few, False)):
        expected = x @ w.t() + base.bias
        merged_calls.clear()
        with torch.no_grad():
            torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
        assert bool(merged_calls) == weight_path
        merged_calls.clear()
        torch.testing.assert_close(layer(x).detach(), expected, atol=1e-5, rtol=1e-5)  # training path
        assert not merged_calls


def test_fused_path_steps_aside_for_hooks():
    base = nn.Linear(12, 10)
    layer = wrap(base)
    seen = []
    base.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    layer(torch.randn(2, 3, 12))
    assert seen == [(2, 3, 10)]


def test_hooked_base_output_is_not_modified_in_place():
    base = nn.Linear(12, 10)
    layer = wrap(base)
    seen = []
    base.register_forward_hook(lambda m, i, o: seen.append(o.clone()) or seen.append(o))
    with torch.no_grad():
        layer(torch.randn(2, 3, 12))
    assert torch.equal(seen[0], seen[1])  # the tensor the hook holds still is the base output
