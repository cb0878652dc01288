"""DeLoRA's weight math as pure functions (the same operations, in the same order, as Hugging Face PEFT)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

NORM_FLOOR = 1e-4  # PEFT clamps the factors' norms from below


def rank_scales(a: Tensor, b: Tensor, lam: Tensor, r: int) -> Tensor:
    """``lambda / r / (||a_i|| ||b_i||)`` (r,): ``a_i`` the rows of ``A`` (r, d_in), ``b_i`` the columns of ``B``
    (d_out, r), each norm clamped at 1e-4."""
    an = torch.clamp(a.norm(dim=1), min=NORM_FLOOR)
    bn = torch.clamp(b.norm(dim=0), min=NORM_FLOOR)
    return lam / r / (an * bn)


def delora_delta(a: Tensor, b: Tensor, lam: Tensor, r: int, w_norm: Tensor) -> Tensor:
    """``dW = B diag(lambda / r / (||a_i|| ||b_i||)) A diag(w_norm)`` as (d_out, d_in)."""
    an = torch.clamp(a.norm(dim=1), min=NORM_FLOOR)
    bn = torch.clamp(b.norm(dim=0), min=NORM_FLOOR)
    diag = torch.diag_embed(lam / r / (an * bn))
    return (b @ diag @ a) * w_norm.unsqueeze(0)


def delora_apply(x: Tensor, a: Tensor, b: Tensor, lam: Tensor, r: int, w_norm: Tensor) -> Tensor:
    """``dW x`` without forming ``dW``: ``B (scales * (A (w_norm * x)))``."""
    h = F.linear(x * w_norm, a)
    return F.linear(h * rank_scales(a, b, lam, r), b)


def column_norms(weight: Tensor) -> Tensor:
    """``||W[:, j]||`` (d_in,) of a (d_out, d_in) weight: the per-input-channel norms PEFT keeps fixed."""
    return torch.norm(weight, dim=0)
