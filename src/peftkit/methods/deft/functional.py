"""DeFT's weight math as pure functions (PEFT's operations, in float32 as PEFT computes them).

Logical layout throughout: ``W`` (d_out, d_in), ``P`` (d_out, r), ``R`` (r, d_in).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def project(p: Tensor, method: str) -> tuple[Tensor, Tensor]:
    """``(Q, right)`` with the projector ``P_proj = Q right^T``: "relu": ``(P, relu(P))``; "qr": ``(Q, Q)``, ``Q``
    the orthonormal factor of the reduced QR of ``P``. Float32 (QR is unreliable in half precision)."""
    p = p.to(torch.float32)
    if method == "relu":
        return p, torch.relu(p)
    q, _ = torch.linalg.qr(p)
    return q, q


def removal_factor(right: Tensor, w: Tensor) -> Tensor:
    """``M = right^T W`` (r, d_in): the only part of the update that reads the frozen weight."""
    return right.t() @ w.to(torch.float32)


def deft_delta(q: Tensor, m: Tensor, r_scaled: Tensor | None) -> Tensor:
    """``dW = Q (s R - M)`` (d_out, d_in), so that ``W + dW = (I - P_proj) W + Q s R``; PaRa (``r_scaled``
    None): ``dW = -Q M = -P_proj W``."""
    return -(q @ m) if r_scaled is None else q @ (r_scaled.to(torch.float32) - m)


def deft_apply(x: Tensor, x_drop: Tensor, q: Tensor, m: Tensor, r_scaled: Tensor | None) -> Tensor:
    """``x dW^T`` without forming ``dW`` or ``P_proj``: ``(x_drop (sR)^T - x M^T) Q^T`` (rank-r products; the
    dropout acts on the injection's input only)."""
    z = -F.linear(x, m) if r_scaled is None else (
        F.linear(x, r_scaled - m) if x_drop is x else F.linear(x_drop, r_scaled) - F.linear(x, m))
    return F.linear(z, q)
