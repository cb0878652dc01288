"""FourierFT's forward kernel: the half-size real inverse FFT equals ``Re(ifft2)`` of the dense spectrum
(values and gradients, every grid shape and index collision), and the fused forward (one GEMM with
``W0 + dW``) equals PEFT's layer and the plain formula."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn

import peftkit
from peftkit.methods.fourierft import (
    FourierFTAdapter, FourierFTConfig, fourier_delta_half, half_spectrum_positions, spectral_locations,
)

from ..parity import TwoProjections, assert_same_outputs_and_grads

TOL = {"atol": 1e-5, "rtol": 1e-5}


def dense_reference(spectrum, rows, cols, d_out, d_in, scaling):
    dense = torch.zeros(d_out, d_in, dtype=spectrum.dtype).index_put((rows, cols), spectrum)
    return torch.fft.ifft2(dense).real * scaling


# even / odd sizes, a single row or column, and full grids (n = d_out d_in: every self-mirrored entry and
# every mirror pair is chosen, so the scatter must accumulate)
SHAPES = [(16, 24, 40), (7, 12, 20), (7, 13, 91), (8, 8, 64), (5, 6, 30), (1, 4, 4), (4, 1, 4), (1, 1, 1), (6, 9, 54)]


@pytest.mark.parametrize(("d_out", "d_in", "n"), SHAPES)
def test_half_spectrum_delta_equals_the_dense_inverse_fft(d_out, d_in, n):
    rows, cols = spectral_locations(d_out, d_in, n, 3)
    src, pos = half_spectrum_positions(rows, cols, d_out, d_in)
    spectrum = torch.randn(n, dtype=torch.float64, requires_grad=True)
    g = torch.randn(d_out, d_in, dtype=torch.float64)
    want = dense_reference(spectrum, rows, cols, d_out, d_in, 150.0)
    got = fourier_delta_half(spectrum, src, pos, d_out, d_in, 150.0)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    (grad_want,) = torch.autograd.grad(want, spectrum, g)
    (grad_got,) = torch.autograd.grad(got, spectrum, g)
    torch.testing.assert_close(grad_got, grad_want, atol=1e-10, rtol=1e-10)


def test_half_spectrum_delta_in_float32_and_half_precision():
    rows, cols = spectral_locations(24, 32, 100, 5)
    src, pos = half_spectrum_positions(rows, cols, 24, 32)
    s = torch.randn(100)
    want = dense_reference(s.double(), rows, cols, 24, 32, 150.0)
    torch.testing.assert_close(fourier_delta_half(s, src, pos, 24, 32, 150.0).double(), want, **TOL)
    bf = fourier_delta_half(s.bfloat16(), src, pos, 24, 32, 150.0)
    assert bf.dtype == torch.bfloat16
    torch.testing.assert_close(bf.double(), dense_reference(s.bfloat16().double(), rows, cols, 24, 32, 150.0),
                               atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("bias", ["none", "all"])
def test_fused_output_and_gradients_equal_peft(bias):
    torch.manual_seed(0)
    model = TwoProjections()
    # a scaling that gives |dW| of the order of W0 here (150 on this 20 x 12 grid: entries around 4)
    kwargs = {"n_frequency": 50, "scaling": 10.0, "target_modules": ["query", "value"], "bias": bias}
    ref = peft.get_peft_model(copy.deepcopy(model), peft.FourierFTConfig(**kwargs))
    ours = peftkit.get_peft_model(copy.deepcopy(model), FourierFTConfig(**kwargs))
    with torch.no_grad():  # the same random spectra (init_weights=False draws from the global generator)
        for n, p in ours.named_parameters():
            if "fourierft_spectrum" in n:
                p.copy_(ref.get_parameter(n.replace(".adapters.default", "") + ".default"))
    x = torch.randn(2, 7, 12)
    assert_same_outputs_and_grads(ref, ours, x, min_params=2)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_fused_forward_equals_the_formula_and_the_generic_path(kind):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = nn.Linear(12, 20) if kind == "linear" else Conv1D(20, 12)
    base.requires_grad_(False)
    a = FourierFTAdapter(base, FourierFTConfig(n_frequency=60, scaling=100.0))
    x = torch.randn(3, 5, 12)
    g = torch.randn(3, 5, 20)
    fused = a.fused_forward(base, x)
    assert fused is not None
    (grad_fused,) = torch.autograd.grad(fused, a.fourierft_spectrum, g)
    generic = a(base, x, base(x))
    (grad_generic,) = torch.autograd.grad(generic, a.fourierft_spectrum, g)
    w = base.weight.t() if kind == "conv1d" else base.weight
    s = a.fourierft_spectrum.detach().double().requires_grad_(True)
    delta = dense_reference(s, a.rows, a.cols, 20, 12, 100.0)
    want = x.double() @ (w.double() + delta).t() + base.bias.double()
    (grad_want,) = torch.autograd.grad(want, s, g.double())
    torch.testing.assert_close(fused.double(), want, **TOL)
    torch.testing.assert_close(generic.double(), want, **TOL)
    torch.testing.assert_close(grad_fused.double(), grad_want, **TOL)
    torch.testing.assert_close(grad_generic.double(), grad_want, **TOL)
    # merges keep PEFT's route exactly
    torch.testing.assert_close(a.delta_weight(base), (delta.t() if kind == "conv1d" else delta).float(), **TOL)
    handle = base.register_forward_pre_hook(lambda *args: None)
    assert a.fused_forward(base, x) is None  # a hook would be skipped: the generic path runs
    handle.remove()
    assert a.fused_forward(base, x.double()) is None
