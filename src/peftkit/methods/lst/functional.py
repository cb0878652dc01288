"""Ladder side-tuning's math on tensors (Sung et al. 2022, arXiv 2206.06522, Eq. 1).

With ``h_0`` the frozen backbone's embedding output, ``h_i`` its block i's output (i = 1..N), ``D_i`` the
down-projections (d -> d / r), ``f_i`` the side blocks and ``U`` the up-projection (d / r -> d):

    s_0 = D_0 h_0
    u_i = mu_i D_i h_i + (1 - mu_i) s_{i-1},   mu_i = sigmoid(alpha_i / T)
    s_i = f_i(u_i)
    y   = h_N + U s_N

``y`` replaces the encoder's last hidden state for the task head.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def gates(alpha: Tensor, temperature: float) -> Tensor:
    """``mu = sigmoid(alpha / T)``, one per block."""
    return torch.sigmoid(alpha / temperature)


def ladder(down: Tensor, side: Tensor, mu: Tensor) -> Tensor:
    """One rung: ``mu * down + (1 - mu) * side`` (``down``: the down-projected backbone state)."""
    return torch.lerp(side, down, mu.to(side.dtype))


def side_forward(h0: Tensor, hidden: Sequence[Tensor], downs: Sequence[Callable[[Tensor], Tensor]],
                 blocks: Sequence[Callable[[Tensor], Tensor]], mu: Tensor) -> Tensor:
    """``s_N`` from the backbone states ``h_0`` and ``hidden`` = ``[h_1 .. h_N]`` (detached or not: the caller's)."""
    s = downs[0](h0)
    for i, (h, block) in enumerate(zip(hidden, blocks, strict=True)):
        s = block(ladder(downs[i + 1](h), s, mu[i]))
    return s
