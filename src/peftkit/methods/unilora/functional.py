"""Uni-LoRA's projection as pure functions (PEFT's arithmetic and random draws)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def balanced_index(count: int, length: int, seed: int) -> Tensor:
    """Which entry of ``theta_d`` (length ``d``) each of the ``D`` = ``count`` flattened LoRA entries reads: every
    index ``floor(D / d)`` times, ``D mod d`` distinct ones once more, shuffled by ``numpy``'s generator seeded with
    ``seed`` (PEFT's ``UniLoraModel.generate_index``, draw for draw). Long (D,)."""
    rng = np.random.default_rng(seed)
    data = np.repeat(np.arange(length), count // length)
    if count % length:
        data = np.concatenate([data, rng.choice(length, size=count % length, replace=False)])
    rng.shuffle(data)
    return torch.as_tensor(data, dtype=torch.long)


def inverse_sqrt_counts(index: Tensor, length: int) -> Tensor:
    """``1 / sqrt(n_i)`` for each entry i of ``theta_d`` read ``n_i`` times (0 where unread), float32 (length,):
    the normalisation that keeps each projection column of unit norm (the paper's isometric P)."""
    counts = torch.bincount(index, minlength=length)
    out = torch.zeros(length, dtype=torch.float32)
    used = counts > 0
    out[used] = counts[used].float().rsqrt()
    return out


def unilora_factors(theta: Tensor, indices_a: Tensor, indices_b: Tensor, scales_a: Tensor,
                    scales_b: Tensor) -> tuple[Tensor, Tensor]:
    """``A = theta[I_A] * S_A`` (r, d_in) and ``B = theta[I_B] * S_B`` (d_out, r)."""
    return theta[indices_a] * scales_a, theta[indices_b] * scales_b
