"""Delta-LoRA's math as pure functions.

Layouts: ``A`` (r, d_in), ``B`` (d_out, r), weights (d_out, d_in). The paper's update (Algorithm 1), after each
optimizer step ``t > K``:

    W_{t+1} = W_t + lambda s (B_{t+1} A_{t+1} - B_t A_t)                                  (``paper_update``)

The sum telescopes: with ``(A_0', B_0')`` the factors after step K (the ``start`` factors),

    W_T = W_0 + lambda s (B_T A_T - B_0' A_0')                                            (``weight_update``)

for every T > K (and ``W_T = W_0`` before), whatever the optimizer did to A and B in between: W's whole change is
of rank <= 2r and is known from the current and the start factors alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..lora.functional import lora_delta


def paper_update(w: Tensor, A_new: Tensor, B_new: Tensor, A_old: Tensor, B_old: Tensor, scaling: float,
                 ratio: float) -> Tensor:
    """One step of the paper's in-place update: ``W + lambda s (B_new A_new - B_old A_old)`` (reference)."""
    return w + ratio * (lora_delta(A_new, B_new, scaling) - lora_delta(A_old, B_old, scaling))


def weight_update(A: Tensor, B: Tensor, A_start: Tensor, B_start: Tensor, scaling: float, ratio: float) -> Tensor:
    """``W_T - W_0 = lambda s (B A - B_start A_start)``: the paper's updates of W summed."""
    return ratio * (lora_delta(A, B, scaling) - lora_delta(A_start, B_start, scaling))


def delta(A: Tensor, B: Tensor, A_start: Tensor, B_start: Tensor, scaling: float, ratio: float) -> Tensor:
    """The layer's whole change ``(W_T + s B A) - W_0 = s ((1 + lambda) B A - lambda B_start A_start)``."""
    return lora_delta(A, B, scaling) + weight_update(A, B, A_start, B_start, scaling, ratio)


def output(x: Tensor, A: Tensor, B: Tensor, A_start: Tensor, B_start: Tensor, scaling: float, ratio: float) -> Tensor:
    """What the adapter adds to ``W_0 x``: ``s B A x + (W_T - W_0) x``. The factors get their gradients through
    ``s B A x`` only (W is not differentiated: the paper moves it by the factors' delta, never by its own
    gradient); the input's gradient goes through both, ``W_T`` being the layer's weight. ``W_T - W_0`` acts through
    its factors, as one rank-2r product ``lambda s [B, -B_start] [A; A_start] x`` of detached factors: no
    (d_out, d_in) matrix, and autograd keeps no input for it."""
    y = F.linear(F.linear(x, A), B) * scaling
    if ratio == 0:
        return y
    A2 = torch.cat([A.detach(), A_start], 0)  # (2r, d_in)
    B2 = torch.cat([B.detach(), -B_start], 1)  # (d_out, 2r)
    return y + F.linear(F.linear(x, A2), B2) * (ratio * scaling)


def accumulate(out: Tensor, x: Tensor, A: Tensor, B: Tensor, A_start: Tensor, B_start: Tensor, scaling: float,
               ratio: float) -> Tensor:
    """``out + output(x, ...)`` (``out``: the base output, of the factors' dtype) as two GEMMs accumulating into one
    fresh tensor, the second in place: no (n, d_out) temporaries beside the result. Same gradients as ``output``."""
    n = out.shape[-1]
    x2d = x.reshape(-1, x.shape[-1])
    y = torch.addmm(out.reshape(-1, n), F.linear(x2d, A), B.t(), alpha=scaling)
    if ratio != 0:
        A2 = torch.cat([A.detach(), A_start], 0)
        B2 = torch.cat([B.detach(), -B_start], 1)
        y.addmm_(F.linear(x2d, A2), B2.t(), alpha=ratio * scaling)
    return y.view(out.shape)
