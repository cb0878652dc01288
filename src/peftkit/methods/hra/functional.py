"""HRA's weight math as pure functions (the same operations, in the same order, as Hugging Face PEFT)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def householder_product(u: Tensor, apply_gs: bool, reverse: bool = False) -> Tensor:
    """``H`` (n, n) from the reflection vectors ``u`` (n, r).

    Without Gram-Schmidt: ``H = prod_i (I - 2 u_i u_i^T / ||u_i||^2)`` for i = 0 .. r-1 (``reverse``: i = r-1 .. 0,
    which is ``H^T = H^-1``). With Gram-Schmidt: the orthonormalised vectors ``U`` give ``H = I - 2 U U^T``
    (symmetric and its own inverse)."""
    n, r = u.shape
    eye = torch.eye(n, device=u.device, dtype=u.dtype)
    if apply_gs:
        w = gram_schmidt(u)
        return eye - 2 * w @ w.t()
    u = u / u.norm(dim=0)
    h = eye
    for i in (range(r - 1, -1, -1) if reverse else range(r)):
        ui = u[:, i].view(-1, 1)
        h = h - 2 * h @ ui @ ui.t()
    return h


def gram_schmidt(u: Tensor) -> Tensor:
    """The columns of ``u`` (n, r) orthonormalised in order (classical Gram-Schmidt, PEFT's loop)."""
    cols = [(u[:, 0] / u[:, 0].norm()).view(-1, 1)]
    for i in range(1, u.shape[1]):
        ui = u[:, i].view(-1, 1)
        for j in range(i):
            ui = ui - (cols[j].t() @ ui) * cols[j]
        cols.append((ui / ui.norm()).view(-1, 1))
    return torch.cat(cols, dim=1)


def compact_wy(u: Tensor, apply_gs: bool) -> tuple[Tensor, Tensor]:
    """``(V, T)`` with ``H = I - V T V^T`` (``householder_product``'s H, compact WY form): ``V`` (n, r) the unit
    vectors, ``T`` (r, r) upper triangular with ``T^-1 = I / 2 + triu(V^T V, 1)`` (Schreiber and Van Loan, for
    reflections ``I - 2 v v^T``). With Gram-Schmidt ``V`` is the orthonormalised ``u`` and ``T = 2 I``. O(n r^2)
    instead of the chain's O(n^2 r) and no (n, n) matrix."""
    r = u.shape[1]
    eye = torch.eye(r, device=u.device, dtype=u.dtype)
    if apply_gs:
        return gram_schmidt(u), 2 * eye
    v = u / u.norm(dim=0)
    t = torch.linalg.solve_triangular(torch.triu(v.t() @ v, diagonal=1) + 0.5 * eye, eye, upper=True)
    return v, t


def reflect_rows_delta(x: Tensor, v: Tensor, t: Tensor) -> Tensor:
    """``x H^T - x = -((x V) T^T) V^T`` for rows ``x`` (..., n): what the chain adds to each input, so that
    ``F.linear(x, W H) = F.linear(x + reflect_rows_delta(x, V, T), W)`` with the frozen ``W`` (no (d_out, n)
    product ``W H``, no weight-sized gradient)."""
    return -((x @ v) @ t.t()) @ v.t()


def symmetric_init(n: int, r: int, dtype: torch.dtype, device: torch.device | str | None = None) -> Tensor:
    """PEFT's default init for an even ``r``: r/2 Kaiming-uniform columns, each repeated twice (paired equal
    reflections cancel, so ``H = I``)."""
    half = torch.zeros(n, r // 2)
    torch.nn.init.kaiming_uniform_(half, a=math.sqrt(5))
    return torch.repeat_interleave(half, 2, dim=1).to(device=device, dtype=dtype)
