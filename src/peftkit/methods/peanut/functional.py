"""PEANuT's weight math as pure functions (the same operations, in the same order, as Hugging Face PEFT).

``w_t`` is the frozen weight read input-major, (d_in, d_out): each input channel's row of weights is one
sample the tweaker network maps to that channel's row of the update.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch.nn.functional as F
from torch import Tensor


def tweak(w_t: Tensor, a: Tensor, encoders: Sequence[Tensor], decoders: Sequence[Tensor],
          act: Callable[[Tensor], Tensor]) -> Tensor:
    """The network's hidden output ``H`` (d_in, r) on the rows of ``w_t`` (d_in, d_out).

    ``H_0 = act(w_t A^T)`` with ``A`` (r, d_out); then ``depth`` encoders ``H <- act(H E_i^T)`` (r, r), each
    input kept as a residual, and ``depth`` decoders ``H <- act(H D_i^T) + residual`` in reverse order."""
    h = act(F.linear(w_t, a))
    residuals = []
    for e in encoders:
        residuals.append(h)
        h = act(F.linear(h, e))
    for i, d in enumerate(decoders):
        h = act(F.linear(h, d)) + residuals[len(residuals) - 1 - i]
    return h


def peanut_delta(h: Tensor, b: Tensor, scaling: float) -> Tensor:
    """``dW = scaling (H B^T)^T`` (d_out, d_in), ``B`` (d_out, r)."""
    return (F.linear(h, b) * scaling).t()


def peanut_apply(x: Tensor, h: Tensor, b: Tensor, scaling: float) -> Tensor:
    """``x dW^T = ((scaling x H) B^T)`` without forming ``dW``: two rank-r products (the scaling on the rank-r
    intermediate, skipped at 1)."""
    z = x @ h
    return F.linear(z if scaling == 1.0 else z * scaling, b)
