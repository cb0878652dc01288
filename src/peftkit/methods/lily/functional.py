"""Lily's math as pure functions. ``a`` (r, d_in), ``experts`` (num_B r, d_out), ``router`` (num_B, r)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def mixed_expert(hidden: Tensor, experts: Tensor, router: Tensor) -> Tensor:
    """The expert mix (r, d_out) for one call: softmax router weights averaged over every token of the batch."""
    num_b = router.shape[0]
    probs = F.softmax(F.linear(hidden, router), dim=-1).reshape(-1, num_b).mean(dim=0)  # (num_B,)
    return torch.einsum("e,eio->io", probs, experts.reshape(num_b, -1, experts.shape[1]))


def lily_forward(x: Tensor, a: Tensor, experts: Tensor, router: Tensor) -> Tensor:
    """``(x A^T) sum_e p_e B_e`` (..., d_out), ``p`` the batch-averaged router weights."""
    hidden = F.linear(x, a)  # (..., r)
    return torch.matmul(hidden, mixed_expert(hidden, experts, router))
