"""GraLoRA's weight math as pure functions.

Shapes (as PEFT's tensors): ``a`` (k, d_in / k, r), ``b`` (k, r, d_out / k), ``x`` (..., d_in); ``r`` splits into
``k`` groups of ``r / k``: group ``j`` of input block ``n``'s projection feeds output block ``j``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def block_forward(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``dW x`` (..., d_out) without forming ``dW`` (PEFT's two einsums, on any number of leading dims)."""
    k, d_blk, r = a.shape
    lead = x.shape[:-1]
    h = torch.einsum("tni,nir->tnr", x.reshape(-1, k, d_blk), a)  # (T, k blocks in, r)
    h = h.view(-1, k, k, r // k).permute(0, 2, 1, 3).reshape(-1, k, r)  # (T, k blocks out, r)
    return torch.einsum("tjr,jro->tjo", h, b).reshape(*lead, -1)


def block_delta(a: Tensor, b: Tensor) -> Tensor:
    """``dW`` (d_out, d_in): block (j, n) = ``b[j, n-th group]^T a[n, :, j-th group]^T``, a rank r/k product."""
    k, d_blk, r = a.shape
    s = r // k
    a4 = a.view(k, d_blk, k, s)  # (n, i, j, s)
    b4 = b.view(k, k, s, -1)  # (j, n, s, o)
    delta = torch.einsum("nijs,jnso->joni", a4, b4)
    return delta.reshape(k * b.shape[-1], k * d_blk)
