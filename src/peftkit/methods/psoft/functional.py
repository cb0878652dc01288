"""PSOFT's math as pure functions (the same operations, in the same order, as Hugging Face PEFT)."""

from __future__ import annotations

import torch
from torch import Tensor


def svd_factors(weight: Tensor, r: int, mode: str, niter: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """(U_r (d_out, r), S_r (r,), V_r^T (r, d_in)) of a float32 (d_out, d_in) weight: the full SVD, or
    ``torch.svd_lowrank`` under a forked RNG seeded with ``seed`` (the global RNG is left as it was)."""
    if mode == "full":
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        return u[:, :r], s[:r], vh[:r, :]
    fork = {"devices": []} if weight.device.type == "cpu" else {"devices": [weight.device],
                                                                 "device_type": weight.device.type}
    with torch.random.fork_rng(**fork):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(weight, q=r, niter=niter)
    return u[:, :r], s[:r], v[:, :r].t()


def principal_factors(weight: Tensor, r: int, scaling: float, init: str, mode: str, niter: int,
                      seed: int) -> tuple[Tensor, Tensor]:
    """The frozen ``A`` (r, d_in) and ``B`` (d_out, r) with ``s B A = U_r S_r V_r^T`` (W's principal part).

    "psoft_init": ``A = V_r^T`` (orthonormal rows), ``B = U_r S_r / s``; "pissa_init": ``sqrt(S_r / s)`` on each side."""
    u, s, vh = svd_factors(weight, r, mode, niter, seed)
    s = s / scaling
    if init == "psoft_init":
        a, b = vh, u @ torch.diag(s)
    else:
        root = torch.sqrt(s)
        a, b = torch.diag(root) @ vh, u @ torch.diag(root)
    return a.contiguous(), b.contiguous()


def skew(params: Tensor, size: int, rows: Tensor, cols: Tensor) -> Tensor:
    """The skew-symmetric ``Q`` (size, size) whose strict upper triangle is ``params`` (row-major)."""
    q = torch.zeros((size, size), device=params.device, dtype=params.dtype).index_put((rows, cols), params)
    return q - q.transpose(0, 1)


def cayley(q: Tensor) -> Tensor:
    """``(I + Q)(I - Q)^-1`` (float32 for half-precision ``Q``, cast back)."""
    dtype = q.dtype
    if dtype in (torch.float16, torch.bfloat16):
        q = q.float()
    eye = torch.eye(q.shape[0], device=q.device, dtype=q.dtype)
    return torch.linalg.solve(eye - q, eye + q, left=False).to(dtype)


def cayley_neumann(q: Tensor, terms: int, eps: float | None) -> Tensor:
    """PEFT's truncated series ``I + 2 Q + 2 Q^2 + ... + Q^(t-1)`` (``Q`` first scaled to ``||Q||_F <= eps``)."""
    if eps is not None:
        norm = torch.linalg.norm(q, ord="fro")
        if torch.isfinite(norm) and norm > eps:
            q = q * (eps / (norm + 1e-12))
    r = torch.eye(q.shape[0], device=q.device, dtype=q.dtype)
    if terms > 1:
        r = r + 2.0 * q
        if terms > 2:
            q2 = q @ q
            r = r + 2.0 * q2
            power = q2
            for _ in range(3, terms - 1):
                power = power @ q
                r = r + 2.0 * power
            power = power @ q
            r = r + power
    return r


def scaled(r: Tensor, vector_b: Tensor | None, vector_a: Tensor | None) -> Tensor:
    """``diag(vector_b) R diag(vector_a)`` (either side skipped when absent)."""
    if vector_b is not None:
        r = vector_b[:, None] * r
    if vector_a is not None:
        r = r * vector_a[None, :]
    return r


def psoft_delta(a: Tensor, b: Tensor, r: Tensor, scaling: float) -> Tensor:
    """``dW = s B (R - I) A`` as (d_out, d_in)."""
    eye = torch.eye(r.shape[0], device=r.device, dtype=r.dtype)
    return (b @ (r - eye) @ a) * scaling
