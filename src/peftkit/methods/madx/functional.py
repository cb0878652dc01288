"""The NICE additive coupling of MAD-X's invertible adapter (Dinh et al. 2015; Pfeiffer et al. 2020, eq. 3-4).

An embedding e (..., d) is split into e1 = e[..., :d1] and e2 = e[..., d1:], d1 = floor(d / 2), d2 = d - d1:

    forward:  o1 = e1 + F(e2),    o2 = e2 + G(o1),    o = [o1, o2]
    inverse:  e2 = o2 - G(o1),    e1 = o1 - F(e2)

with F: d2 -> d1 and G: d1 -> d2 two-layer bottleneck MLPs ``W_2 f(W_1 x + b_1) + b_2`` whose hidden widths are
``floor(d2 / r)`` and ``floor(d1 / r)`` (their input width over r, the reduction factor; AdapterHub's
``NICECouplingBlock``), f the adapter's non-linearity (ReLU for Pfeiffer). The inverse
is exact in exact arithmetic whatever F and G are; in floating point it round-trips to rounding error.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

Mlp = tuple[Tensor, Tensor, Tensor, Tensor]  # (W_1 (h, d_in), b_1 (h,), W_2 (d_out, h), b_2 (d_out,))


def mlp(x: Tensor, weights: Mlp, act: Callable[[Tensor], Tensor] = F.relu) -> Tensor:
    """``W_2 act(W_1 x + b_1) + b_2``: x (..., d_in) -> (..., d_out)."""
    w1, b1, w2, b2 = weights
    return F.linear(act(F.linear(x, w1, b1)), w2, b2)


def split(e: Tensor) -> tuple[Tensor, Tensor]:
    """(e1, e2): the first floor(d / 2) features and the rest."""
    d1 = e.shape[-1] // 2
    return e[..., :d1], e[..., d1:]


def nice_forward(e: Tensor, f: Mlp, g: Mlp, act: Callable[[Tensor], Tensor] = F.relu) -> Tensor:
    """``[e1 + F(e2), e2 + G(e1 + F(e2))]``: e (..., d) -> (..., d)."""
    e1, e2 = split(e)
    o1 = e1 + mlp(e2, f, act)
    o2 = e2 + mlp(o1, g, act)
    return torch.cat([o1, o2], dim=-1)


def nice_inverse(o: Tensor, f: Mlp, g: Mlp, act: Callable[[Tensor], Tensor] = F.relu) -> Tensor:
    """The exact inverse of :func:`nice_forward`: ``e2 = o2 - G(o1)``, ``e1 = o1 - F(e2)``."""
    o1, o2 = split(o)
    e2 = o2 - mlp(o1, g, act)
    e1 = o1 - mlp(e2, f, act)
    return torch.cat([e1, e2], dim=-1)
