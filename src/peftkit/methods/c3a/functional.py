"""C3A's weight math as pure functions: block-circulant matrices, applied through the FFT or built densely.

The kernel ``w`` has shape (m, n, b): ``m = d_out / b`` row blocks, ``n = d_in / b`` column blocks, each block
the ``b x b`` circulant matrix whose first row is ``w[i, j]``:

    C(w_ij)[s, t] = w_ij[(t - s) mod b],        dW = [C(w_ij)]_{i, j} / d_in        (d_out, d_in)

(Hugging Face PEFT's layout and scale: its ``get_circulant_fast`` / ``BlockCircularConvolution``.) Row ``s`` of
a block times ``x_j`` is a circular cross-correlation, so ``dW x`` is, per output block ``i``,

    y_i = irfft( sum_j  conj(rfft(w_ij)) * rfft(x_j) ) / d_in

``d_out d_in / b`` complex multiply-adds per token plus ``O((d_in + d_out) log b)`` for the transforms,
against ``d_out d_in`` for a dense product: fewer by a factor of about ``b / 2``, with no ``d_out x d_in``
tensor. The real FFT (``rfft``) halves PEFT's complex ``fft`` / ``ifft`` work.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.fft import irfft, rfft


def circulant_index(b: int, device: torch.device | str | None = None) -> Tensor:
    """(b, b) long: ``[s, t] = (t - s) mod b``, the kernel entry at row ``s``, column ``t`` of a block."""
    r = torch.arange(b, device=device)
    return (r.unsqueeze(0) - r.unsqueeze(1)) % b


def c3a_delta(kernel: Tensor, d_in: int) -> Tensor:
    """The dense block-circulant update ``dW`` (d_out, d_in) = ``[C(w_ij)] / d_in``, by gathering (exact, no FFT
    rounding)."""
    m, n, b = kernel.shape
    blocks = kernel[:, :, circulant_index(b, kernel.device)]  # (m, n, b, b): [i, j, s, t]
    return blocks.permute(0, 2, 1, 3).reshape(m * b, n * b) / d_in


def _spectrum(kernel: Tensor) -> Tensor:
    return rfft(kernel, dim=-1)  # (m, n, b // 2 + 1)


def c3a_product(x: Tensor, kernel: Tensor, scale: float) -> Tensor:
    """``scale * [C(w_ij)] x`` for ``x`` (..., n b) in the kernel's dtype, through the real FFT (no autograd
    graph of its own: ``BlockCirculant`` supplies the gradients)."""
    m, n, b = kernel.shape
    xf = rfft(x.reshape(-1, n, b), dim=-1)  # (T, n, K)
    yf = torch.einsum("tnk,mnk->tmk", xf, _spectrum(kernel).conj())
    y = irfft(yf, n=b, dim=-1)  # (T, m, b)
    return y.mul_(scale).reshape(*x.shape[:-1], m * b)


def c3a_product_transposed(g: Tensor, kernel: Tensor, scale: float) -> Tensor:
    """``scale * [C(w_ij)]^T g`` for ``g`` (..., m b): the input gradient of ``c3a_product`` (a convolution)."""
    m, n, b = kernel.shape
    gf = rfft(g.reshape(-1, m, b), dim=-1)  # (T, m, K)
    xf = torch.einsum("tmk,mnk->tnk", gf, _spectrum(kernel))
    return irfft(xf, n=b, dim=-1).mul_(scale).reshape(*g.shape[:-1], n * b)


def c3a_kernel_grad(x: Tensor, g: Tensor, m: int, n: int, b: int, scale: float) -> Tensor:
    """The gradient of ``sum(g * c3a_product(x, w, scale))`` in ``w`` (m, n, b): per block, the circular
    cross-correlation of the output gradient with the input, summed over tokens."""
    xf = rfft(x.reshape(-1, n, b), dim=-1)  # (T, n, K)
    gf = rfft(g.reshape(-1, m, b), dim=-1)  # (T, m, K)
    wf = torch.einsum("tmk,tnk->mnk", gf.conj(), xf)
    return irfft(wf, n=b, dim=-1).mul_(scale)


class BlockCirculant(torch.autograd.Function):
    """``y = scale * [C(w_ij)] x`` through the FFT. Saves only ``x`` (which the base layer keeps anyway) and the
    kernel; the backward pass transforms them again instead of keeping spectra alive between the passes."""

    @staticmethod
    def forward(ctx, x: Tensor, kernel: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, kernel)
        ctx.scale = scale
        return c3a_product(x.to(kernel.dtype), kernel, scale)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, kernel = ctx.saved_tensors
        m, n, b = kernel.shape
        g = grad.to(kernel.dtype)
        gx = c3a_product_transposed(g, kernel, ctx.scale).to(x.dtype) if ctx.needs_input_grad[0] else None
        gw = c3a_kernel_grad(x.to(kernel.dtype), g, m, n, b, ctx.scale) if ctx.needs_input_grad[1] else None
        return gx, gw, None


def c3a_apply(x: Tensor, kernel: Tensor, d_in: int) -> Tensor:
    """``dW x`` (..., d_out) without forming ``dW``, differentiable in ``x`` and ``kernel``."""
    return BlockCirculant.apply(x, kernel, 1.0 / d_in)


def divisors_of_both(d_in: int, d_out: int) -> list[int]:
    """The block sizes a (d_out, d_in) layer allows: the common divisors of its sizes."""
    return [b for b in range(1, min(d_in, d_out) + 1) if d_in % b == 0 and d_out % b == 0]


# Cost of the FFT route per token, in units of one dense (d_out x d_in) multiply-add pass, measured on CPU
# (fp32, one thread): ``FFT_PRODUCT / b`` for the per-frequency complex products, ``FFT_TRANSFORM`` per
# ``(d_in + d_out) (log2 b + 1)`` for the transforms (both summed over forward and backward).
FFT_PRODUCT = 35.0
FFT_TRANSFORM = 57.0
DENSE_BUILD = 12.0  # forming W0 + dW (and, training, mapping its gradient back): element passes over d_out x d_in


def dense_is_cheaper(tokens: int, d_in: int, d_out: int, b: int, training: bool) -> bool:
    """Whether ``op(x, W0 + dW)`` (one GEMM for base and adapter; training adds the ``dW`` gradient GEMM) costs
    less than the base GEMM plus the FFT route. The FFT route wins on wide layers with large blocks (a 4096-wide
    layer with b = 256 at any token count), the dense one on narrow layers and small blocks."""
    size = d_in * d_out
    fft = tokens * size * (FFT_PRODUCT / b + FFT_TRANSFORM * (d_in + d_out) * (math.log2(b) + 1) / size)
    if not training:
        return size * DENSE_BUILD / 3 < fft / 3  # inference: build once, no extra GEMM
    return tokens * size + size * DENSE_BUILD < fft
