"""RandLoRA's weight math as pure functions (shapes in each docstring; ``m = min(d_in, d_out)``,
``M = max(d_in, d_out)``, ``N = ceil(m / r)`` bases)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def num_bases(d_out: int, d_in: int, r: int) -> int:
    """``N = ceil(min(d_in, d_out) / r)``: enough rank-r bases for a full-rank update."""
    return -(-min(d_out, d_in) // r)


def _basis_dtype() -> torch.dtype:
    """The dtype PEFT draws the dense bases in: bfloat16 where accelerate's ``is_bf16_available`` holds (CPU, and
    CUDA devices that support it), float16 on a CUDA device that does not."""
    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def _kaiming(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """PEFT's ``_kaiming_init``: Kaiming-uniform (a = sqrt 5) into a fresh half-precision tensor."""
    tensor = torch.empty(shape, dtype=_basis_dtype())
    with torch.no_grad():
        return torch.nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=generator)


def dense_bases(r: int, d_out: int, d_in: int, seed: int) -> tuple[Tensor, Tensor]:
    """The shared bases for a largest target of (d_out, d_in), as PEFT draws them: ``A`` (r, 1, m) then ``N``
    blocks of ``B`` (M, 1, r) from one CPU generator, each divided by its std (in half precision), returned
    as float32 (PEFT casts them to the base layer's dtype when it first attaches them)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    small, large = min(d_out, d_in), max(d_out, d_in)
    a = _kaiming((r, 1, small), generator)
    b = torch.cat([_kaiming((large, 1, r), generator) for _ in range(num_bases(d_out, d_in, r))], dim=1)
    return (a / a.std()).float(), (b / b.std()).float()


def sparse_bases(r: int, d_out: int, d_in: int, seed: int, sparsity: float) -> tuple[Tensor, Tensor]:
    """Ternary bases (arXiv 2502.00987 section 4.4, after Li et al. 2006): entries -1 / 1 with probability
    ``1 / (2 sparsity)`` each, 0 otherwise, divided by their std. ``sparsity`` 3 is ``sparse``, ``sqrt(m)``
    ``very_sparse``. Drawn as PEFT: uniform ``A`` (r, 1, m) then ``B`` (M, N, r) from one CPU generator."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    small, large = min(d_out, d_in), max(d_out, d_in)
    a = torch.rand((r, 1, small), generator=generator)
    b = torch.rand((large, num_bases(d_out, d_in, r), r), generator=generator)
    out = []
    for u in (a, b):
        t = torch.zeros(u.shape)
        t[u < 1 / (2 * sparsity)] = -1
        t[u > 1 - 1 / (2 * sparsity)] = 1
        out.append(t / t.std())
    return out[0], out[1]


def factors(a: Tensor, b: Tensor, lam: Tensor, gamma: Tensor, d_out: int, d_in: int) -> tuple[Tensor, Tensor]:
    """(down (K, d_in), up (d_out, K)), K = r N, with ``delta = up @ down * s``.

    ``a`` (r, 1, >= m) and ``b`` (>= M, >= N, r) are the shared bases, sliced here; ``lam`` (r, N) and ``gamma``
    (N, m) the layer's diagonals. The scaled small basis ``lam[i, n] A[i, :] gamma[n, :]`` is flattened (rank,
    basis) and ``B`` (basis, rank), as PEFT does; the scaled side sits on the layer's smaller dimension."""
    r, n = lam.shape
    small, large = min(d_out, d_in), max(d_out, d_in)
    scaled = ScaledBasis.apply(lam, a[:, 0, :small], gamma).flatten(0, 1)  # (r N, m)
    flat_b = b[:large, :n, :].flatten(1)  # (M, N r)
    if small == d_in:
        return scaled, flat_b
    return flat_b.t(), scaled.t()


def delta(down: Tensor, up: Tensor, scaling: float) -> Tensor:
    """``dW = s up down`` (d_out, d_in), computed as PEFT: ``(down^T up^T)^T s``."""
    return (down.t() @ up.t()).t() * scaling


class ScaledBasis(torch.autograd.Function):
    """``lam[i, n] A[i, :] gamma[n, :]`` (r, N, m) from ``lam`` (r, N), ``A`` (r, m), ``gamma`` (N, m), keeping only
    the three small operands for backward: the autograd of the two products keeps an (r, N, m) intermediate per layer
    (r N m = 147,456 floats at r 32 on a 384-wide layer; the layer's ``x`` is no larger)."""

    @staticmethod
    def forward(ctx, lam: Tensor, a: Tensor, gamma: Tensor) -> Tensor:  # noqa: ANN001
        ctx.save_for_backward(lam, a, gamma)
        return lam[:, :, None] * a[:, None, :] * gamma[None]

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # noqa: ANN001
        lam, a, gamma = ctx.saved_tensors
        need_lam, need_a, need_gamma = ctx.needs_input_grad
        grad_lam = torch.einsum("ink,ik,nk->in", g, a, gamma) if need_lam else None
        grad_a = torch.einsum("ink,in,nk->ik", g, lam, gamma) if need_a else None
        grad_gamma = torch.einsum("ink,in,ik->nk", g, lam, a) if need_gamma else None
        return grad_lam, grad_a, grad_gamma

