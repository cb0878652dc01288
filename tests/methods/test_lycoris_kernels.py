"""LoHa / LoKr fused forward (one GEMM with ``W0 + dW`` on a Linear / Conv1D base): outputs and gradients
equal PEFT's layers (separate base and delta products) and the plain formula, on both base layouts."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn

import peftkit
from peftkit.methods.lycoris import LoHaAdapter, LoHaConfig, LoKrAdapter, LoKrConfig
from peftkit.methods.lycoris import functional as YF

from ..parity import TwoProjections, assert_same_outputs_and_grads

TOL = {"atol": 1e-5, "rtol": 1e-5}
CASES = [
    ("loha", {"r": 3, "alpha": 5}),
    ("lokr", {"r": 4, "alpha": 3}),  # W2 whole
    ("lokr", {"r": 1, "alpha": 2, "decompose_both": True}),  # W1 and W2 low rank
]
IDS = ["loha", "lokr-full", "lokr-low-rank"]
CLASSES = {"loha": (peft.LoHaConfig, LoHaConfig), "lokr": (peft.LoKrConfig, LoKrConfig)}


def _pair(method: str, kwargs: dict):
    torch.manual_seed(0)
    model = TwoProjections()
    ref_cls, our_cls = CLASSES[method]
    common = {**kwargs, "init_weights": False, "target_modules": ["query", "value"]}
    ref = peft.get_peft_model(copy.deepcopy(model), ref_cls(**common))
    ours = peftkit.get_peft_model(copy.deepcopy(model), our_cls(**common))
    mods = dict(ref.named_modules())
    for path, adapter in ours.base_model.adapters("default"):
        ref_layer = next(m for n, m in mods.items() if n.endswith(path) and hasattr(m, "base_layer"))
        with torch.no_grad():
            for name in adapter._names:
                theirs = getattr(ref_layer, name)["default"]
                theirs.mul_(1.3).add_(0.1)  # away from the init (no factor zero)
                getattr(adapter, name).copy_(theirs)
    return ref, ours


@pytest.mark.parametrize(("method", "kwargs"), CASES, ids=IDS)
def test_fused_output_and_gradients_equal_peft(method, kwargs):
    ref, ours = _pair(method, kwargs)
    x = torch.randn(2, 7, 12)
    for mode in ("train", "eval"):
        getattr(ref, mode)(), getattr(ours, mode)()
        assert_same_outputs_and_grads(ref, ours, x, min_params=4)


def _adapter(method: str, base: nn.Module, **extra):
    torch.manual_seed(1)
    if method == "loha":
        return LoHaAdapter(base, LoHaConfig(r=3, alpha=5, init_weights=False, **extra))
    return LoKrAdapter(base, LoKrConfig(r=1, alpha=2, decompose_both=True, init_weights=False, **extra))


@pytest.mark.parametrize("method", ["loha", "lokr"])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_fused_forward_equals_the_formula_and_the_generic_path(method, kind):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = nn.Linear(12, 20) if kind == "linear" else Conv1D(20, 12)  # Conv1D weight (d_in, d_out)
    base.requires_grad_(False)
    a = _adapter(method, base)
    x = torch.randn(3, 5, 12, dtype=torch.float64).float()
    params = [p for p in a.parameters()]
    w_natural = base.weight.t() if kind == "conv1d" else base.weight
    g = torch.randn(3, 5, 20)

    fused = a.fused_forward(base, x)
    assert fused is not None
    fused_grads = torch.autograd.grad(fused, params, g)
    generic = a(base, x, base(x))
    generic_grads = torch.autograd.grad(generic, params, g)
    # the formula, in float64
    delta = a._natural_delta().double()
    want = x.double() @ (w_natural.double() + delta).t() + base.bias.double()
    torch.testing.assert_close(fused.double(), want, **TOL)
    torch.testing.assert_close(fused, generic, **TOL)
    for got, ref in zip(fused_grads, generic_grads):
        torch.testing.assert_close(got, ref, **TOL)


def test_fused_forward_rank_dropout_draws_the_same_mask_as_the_generic_path():
    base = nn.Linear(12, 20)
    a = _adapter("loha", base, rank_dropout=0.5)
    a.train()
    x = torch.randn(4, 12)
    torch.manual_seed(7)
    fused = a.fused_forward(base, x)
    torch.manual_seed(7)
    generic = a(base, x, base(x))
    torch.testing.assert_close(fused, generic, **TOL)
    assert not torch.allclose(fused, base(x) + x @ a._natural_delta().t(), atol=1e-3)  # some rows dropped


def test_fused_forward_declines_where_the_generic_path_must_run():
    base = nn.Linear(12, 20)
    a = _adapter("lokr", base, module_dropout=0.5)
    x = torch.randn(8, 12)  # at least d_in d_out / (d_in + d_out) = 7.5 rows: forming W1 (x) W2 pays
    assert a.train().fused_forward(base, x) is None  # module dropout: the generic path draws the skip
    expected = base(x) + x @ a._natural_delta().t()
    torch.testing.assert_close(a.eval().fused_forward(base, x), expected, **TOL)
    assert a.fused_forward(base, x[:7]) is None  # fewer rows (decoding): kron_matvec, no Kronecker product
    assert a.fused_forward(base, x.double()) is None  # mixed dtypes
    handle = base.register_forward_hook(lambda *args: None)
    assert a.fused_forward(base, x) is None  # a hook would be skipped
    handle.remove()


def test_hadamard_delta_with_base_adds_it_and_passes_its_gradient():
    g = torch.Generator().manual_seed(4)
    shapes = ((6, 2), (2, 5), (6, 2), (2, 5), (6, 5))
    t = [torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]
    assert torch.autograd.gradcheck(lambda a, b, c, d, w: YF.hadamard_delta(a, b, c, d, 0.7, w), t)
    want = t[4] + (t[0] @ t[1]) * (t[2] @ t[3]) * 0.7
    torch.testing.assert_close(YF.hadamard_delta(*t[:4], 0.7, t[4]), want, atol=1e-12, rtol=1e-12)
    frozen = t[4].detach()
    out = YF.hadamard_delta(*t[:4], 0.7, frozen)
    grads = torch.autograd.grad(out.sum(), t[:4])
    ref = torch.autograd.grad(((t[0] @ t[1]) * (t[2] @ t[3]) * 0.7).sum(), t[:4])
    for got, r in zip(grads, ref):
        torch.testing.assert_close(got, r, atol=1e-12, rtol=1e-12)
