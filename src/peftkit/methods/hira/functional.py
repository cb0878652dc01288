"""HiRA weight math as pure functions.

Shapes: Linear / Conv1D (in the (d_out, d_in) layout of ``nn.Linear``): ``A`` (r, d_in), ``B`` (d_out, r);
Embedding: ``A`` (r, num_embeddings), ``B`` (dim, r), the modulation transposed to the (num_embeddings, dim)
weight; Conv: ``A`` (r, c_in, *k), ``B`` (c_out, r, 1, ..).
"""

from __future__ import annotations

import torch
from torch import Tensor


def modulation(a: Tensor, b: Tensor) -> Tensor:
    """``B A``: (d_out, d_in) from ``A`` (r, d_in), ``B`` (d_out, r); conv: (c_out, c_in, *k) from ``A``
    (r, c_in, *k) and ``B`` (c_out, r, 1, ..) (PEFT's 1 x 1 convolution of ``A`` with ``B``)."""
    if a.dim() == 2:
        return b @ a
    return torch.einsum("or,ri...->oi...", b.flatten(1), a)


def hadamard_merge(w: Tensor, mod: Tensor) -> Tensor:
    """``W0 + W0 * M`` in ``w``'s dtype (PEFT adds ``base_weight * delta`` with the delta cast first)."""
    return (w + w * mod.to(w.dtype)).contiguous()


def hadamard_unmerge(merged: Tensor, mod: Tensor) -> Tensor:
    """``W' / (1 + M)``; entries where ``1 + M`` is zero keep ``W'`` (the wrapper's exact-restore record
    corrects them), and the result stays finite."""
    denom = 1 + mod.to(merged.dtype)
    out = torch.where(denom == 0, merged, merged / torch.where(denom == 0, torch.ones_like(denom), denom))
    return torch.nan_to_num(out).contiguous()
