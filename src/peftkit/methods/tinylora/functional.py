"""TinyLoRA's weight math as pure functions (PEFT's arithmetic and random draws, step for step).

Shapes: ``W`` (d_out, d_in) in the Linear layout (an Embedding's weight (num_embeddings, dim) as it is),
``A`` (r, d_in), ``B`` (d_out, r), ``P`` (u, r, r), ``v`` (u,), ``R`` (r, r).
"""

from __future__ import annotations

import torch
from torch import Tensor


def svd_frame(weight: Tensor, r: int, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """The frozen frame of ``W = U S V^T``: ``A = diag(sqrt S_r) V_r^T`` (r', d_in) and ``B = U_r diag(sqrt S_r)``
    (d_out, r'), ``r' = min(r, d_out, d_in)``; the SVD in float32, the factors cast to ``dtype`` (default the
    weight's) before the square root, as PEFT. ``B A`` is the best rank-r' approximation of ``W``."""
    dtype = dtype or weight.dtype
    u, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    k = min(r, weight.shape[0], weight.shape[1])
    u_r, s_r, v_r = u[:, :k].to(dtype), s[:k].to(dtype), vh[:k, :].to(dtype)
    sqrt_s = torch.sqrt(s_r)
    return (sqrt_s.unsqueeze(1) * v_r).contiguous(), (u_r * sqrt_s.unsqueeze(0)).contiguous()


def projections(u: int, r: int, seed: int) -> Tensor:
    """The fixed random projections ``P`` (u, r, r), entries ``N(0, 1 / r)`` from a CPU generator seeded with
    ``seed`` (PEFT: ``projection_seed`` plus the layer's index among the adapter's targets), float32."""
    generator = torch.Generator().manual_seed(seed)
    return torch.normal(mean=0.0, std=1.0 / (r**0.5), size=(u, r, r), generator=generator)


def mix(v: Tensor, p: Tensor) -> Tensor:
    """``R = sum_i v_i P_i`` (r, r), in ``v``'s dtype."""
    return torch.einsum("i,ijk->jk", v, p.to(device=v.device, dtype=v.dtype))


def delta(a: Tensor, b: Tensor, r_mat: Tensor) -> Tensor:
    """``dW = B R A`` (d_out, d_in), multiplied left to right as PEFT."""
    return b @ r_mat @ a


def num_groups(num_targets: int, weight_tying: float) -> int:
    """How many trained vectors an adapter on ``num_targets`` layers has: ``max(1, round(n (1 - tying)))``
    (Python's round, half to even, as PEFT)."""
    return max(1, round(num_targets * (1.0 - weight_tying)))


def group_of(index: int, num_targets: int, weight_tying: float) -> int:
    """The vector the target at ``index`` (its position among the adapter's targets, in module order) reads:
    consecutive runs of ``n // groups`` targets share one, the last group takes the remainder."""
    groups = num_groups(num_targets, weight_tying)
    size = max(1, num_targets // groups)
    return min(index // size, groups - 1)
