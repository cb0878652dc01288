"""FacT's update as pure functions on tensors.

A weight of shape (d_out, d_in) is ``a x b`` slices of d x d (``a = ceil(d_out / d)``, ``b = ceil(d_in / d)``); its
cores, stacked, form ``S`` (a r, b r), whose (i, j) block of r x r is slice (i, j)'s core. The update is

    dW = s crop((I_a (x) U) S (I_b (x) V)^T),   block (i, j) = s U S_ij V^T,

cropped to (d_out, d_in) when a width is not a multiple of d.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def num_slices(width: int, d: int) -> int:
    """How many d-wide slices cover ``width`` (the last one cropped when d does not divide it)."""
    return math.ceil(width / d)


def tucker_cores(core: Tensor, p: Tensor, a: int, b: int) -> Tensor:
    """FacT-TK: the stacked cores ``S`` (a r, b r) of one weight from the shared core ``C`` (r, r, r) and the
    weight's rows of ``P`` (a b, r), slice by slice ``S_ij = sum_k C[:, :, k] P[i b + j, k]`` (C x3 P)."""
    r = core.shape[0]
    s = torch.einsum("xyk,nk->nxy", core, p)  # (a b, r, r)
    return s.reshape(a, b, r, r).permute(0, 2, 1, 3).reshape(a * r, b * r)


def fact_delta(u: Tensor, v: Tensor, s: Tensor, d_out: int, d_in: int, scale: float) -> Tensor:
    """``dW`` (d_out, d_in) from ``U`` (d, r) (output side), ``V`` (d, r) (input side), ``S`` (a r, b r)."""
    d, r = u.shape
    a, b = s.shape[0] // r, s.shape[1] // r
    blocks = torch.einsum("pi,aibj,qj->apbq", u, s.reshape(a, r, b, r), v)  # (a, d, b, d)
    return scale * blocks.reshape(a * d, b * d)[:d_out, :d_in]


def fact_apply(x: Tensor, u: Tensor, v: Tensor, s: Tensor, d_out: int, scale: float, dropout=None) -> Tensor:
    """``dW x`` without forming dW: x (..., d_in) -> (..., d_out). The input is cut into b slices of d (zero-padded),
    each projected by ``V^T``, mixed by ``S``, and each of the a output slices lifted by ``U``."""
    d, r = u.shape
    a, b = s.shape[0] // r, s.shape[1] // r
    pad = b * d - x.shape[-1]
    if pad:
        x = F.pad(x, (0, pad))
    # the products as 2-D matrices: one kernel whatever the strides and whether the factors require grad (a batched
    # matmul picks its path by both, and a loaded adapter, frozen, would differ from the trained one in the last bit)
    h = (x.reshape(-1, d) @ v).reshape(*x.shape[:-1], b * r)  # (..., b r)
    h = F.linear(h, s)  # (..., a r)
    if dropout is not None:
        h = dropout(h)
    y = (h.reshape(-1, r) @ u.t()).reshape(*h.shape[:-1], a * d)  # (..., a d)
    return scale * y[..., :d_out]
