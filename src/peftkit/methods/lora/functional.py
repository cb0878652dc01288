"""LoRA weight math as pure functions on tensors (no modules, no state): testable alone.

Layouts: ``A`` is (r, d_in), ``B`` is (d_out, r), weights are (d_out, d_in) unless stated.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...quant import require_bnb


def lora_delta(A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """``s * B @ A`` (d_out, d_in). For conv layers A is (r, c_in, *k) and B is (d_out, r, 1...)."""
    r = A.shape[0]
    delta = B.reshape(B.shape[0], r) @ A.reshape(r, -1)
    return (delta * scaling).reshape(B.shape[0], *A.shape[1:])


def row_sq_norm(w: Tensor) -> Tensor:
    """Squared L2 norm of each row of a 2-D matrix."""
    return (w * w).sum(dim=1)


def dora_norm_lowrank(w0: Tensor, A: Tensor, B: Tensor, scaling: float, w0_sq: Tensor | None = None) -> Tensor:
    """Row norms ``||W0 + s B A||`` without forming the (d_out, d_in) product.

    ``||W0_i + s (BA)_i||^2 = ||W0_i||^2 + 2 s <B_i, (W0 A^T)_i> + s^2 B_i (A A^T) B_i^T``: one
    (d_out x d_in x r) matmul, the same work as ``B @ A``, but no full-size temporaries. Evaluated as
    ``||W0_i||^2 + <B_i, C_i>`` with ``C = 2 s W0 A^T + s^2 B (A A^T)`` (d_out, r): six small kernels.
    """
    if w0_sq is None:
        w0_sq = row_sq_norm(w0)
    w0a = (A @ w0.t()).t()  # (d_out, r); on CPU about 1.4x faster than w0 @ A.t() for a small r
    gram = A @ A.t()  # (r, r)
    c = torch.addmm(w0a, B, gram, beta=2 * scaling, alpha=scaling * scaling)  # (d_out, r)
    sq = torch.linalg.vecdot(B, c, dim=1).add_(w0_sq)
    return sq.clamp_min_(0).sqrt_()


def norm_except(w: Tensor, out_axis: int) -> Tensor:
    """L2 norm over every axis but ``out_axis`` (one value per output feature)."""
    dims = tuple(d for d in range(w.dim()) if d != out_axis)
    return torch.linalg.vector_norm(w, dim=dims)


def along(v: Tensor, ndim: int, axis: int) -> Tensor:
    """Reshape a vector so it broadcasts along ``axis`` of an ``ndim``-dimensional tensor."""
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def dora_merge(weight: Tensor, delta: Tensor, magnitude: Tensor, out_axis: int) -> tuple[Tensor, Tensor]:
    """DoRA's merged weight ``m * V / ||V||`` with ``V = W0 + delta``; returns it and ``||V||``."""
    v = weight + delta
    norm = norm_except(v, out_axis)
    return v * along(magnitude.reshape(-1) / norm, v.dim(), out_axis), norm


def dora_unmerge(merged: Tensor, delta: Tensor, magnitude: Tensor, norm: Tensor, out_axis: int) -> Tensor:
    """Inverse of :func:`dora_merge` given the norm recorded at merge time."""
    return merged / along(magnitude.reshape(-1) / norm, merged.dim(), out_axis) - delta


def pissa_factors(w: Tensor, r: int, scaling: float, niter: int | None = None) -> tuple[Tensor, Tensor]:
    """PiSSA (Meng et al. 2024): A = sqrt(S_r) V_r^T, B = U_r sqrt(S_r) from the SVD of W (S divided by s).

    ``niter`` selects the randomised SVD with that many subspace iterations. The frozen base becomes
    ``W - s B A`` (the residual), which the caller writes back.
    """
    if niter is None:
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        Ur, Sr, Vhr = U[:, :r], S[:r] / scaling, Vh[:r]
    else:
        Ur, Sr, V = torch.svd_lowrank(w, r, niter=niter)
        Sr, Vhr = Sr / scaling, V.t()
    root = torch.sqrt(Sr)
    return root[:, None] * Vhr, Ur * root[None, :]


def olora_factors(w: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """OLoRA (Büyükakyüz 2024): A = R[:r], B = Q[:, :r] from the QR decomposition of W."""
    Q, R = torch.linalg.qr(w)
    return R[:r].contiguous(), Q[:, :r].contiguous()


def quantize_dequantize(w: Tensor, bits: int) -> Tensor:
    """``w`` after a round trip through bitsandbytes' storage format: 4-bit NF4 (blocks of 64, double
    quantization, as QLoRA) or 8-bit row-wise absmax (LLM.int8's ``Int8Params``)."""
    if bits == 8:
        scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
        return torch.round(w / scale).clamp(-127, 127) * scale
    bnbf = require_bnb().functional
    packed, state = bnbf.quantize_4bit(w.float().contiguous(), blocksize=64, compress_statistics=True, quant_type="nf4")
    return bnbf.dequantize_4bit(packed, state).float()


def loftq_factors(w: Tensor, r: int, scaling: float, bits: int = 4, iters: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """LoftQ (Li et al. 2023, arXiv 2310.08659): alternate ``Q = qdq(W - s B A)`` and the rank-r SVD of
    ``W - Q``, so that ``Q + s B A`` approximates ``W`` better than ``Q`` alone.

    Returns ``A`` (r, d_in), ``B`` (d_out, r) and ``Q`` (the dequantized weight the base must hold: it
    re-quantizes to itself in the same format). ``s B A = U_r S_r V_r^T``; ``sqrt(S_r / s)`` goes to each side.
    """
    w = w.float()
    A = w.new_zeros(r, w.shape[1])
    B = w.new_zeros(w.shape[0], r)
    q = w
    for _ in range(iters):
        q = quantize_dequantize(w - scaling * (B @ A), bits)
        U, S, Vh = torch.linalg.svd(w - q, full_matrices=False)
        root = torch.sqrt(S[:r] / scaling)
        A, B = root[:, None] * Vh[:r], U[:, :r] * root[None, :]
    return A, B, q
