"""SHiRA's masks and sparse update as pure functions, in the (d_out, d_in) layout of ``nn.Linear``.

Shapes: mask (d_out, d_in), 0 / 1 with ``K = r (d_in + d_out)`` ones; indices (2, K) int32 (row, column),
in row-major order; values (K,).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...kernel_helpers import layer_dims


def random_mask(base_layer: nn.Module, r: int, random_seed: int | None = None, **kwargs) -> Tensor:
    """PEFT's ``random_mask``: ``K = r (d_in + d_out)`` entries of the (d_out, d_in) weight, the first K of a
    permutation from a fresh CPU generator (seeded with ``random_seed`` when given, else the generator's
    fixed default seed, so every call gives the same mask). A bool tensor on the weight's device."""
    d_out, d_in = layer_dims(base_layer)
    generator = torch.Generator()
    if random_seed is not None:
        generator.manual_seed(random_seed)
    device = base_layer.weight.device
    idx = torch.randperm(d_out * d_in, generator=generator)[: r * (d_in + d_out)]
    mask = torch.zeros(d_out * d_in, dtype=torch.bool)
    mask[idx] = True
    return mask.view(d_out, d_in).to(device)


def mask_indices(mask: Tensor) -> Tensor:
    """(2, K) int32 (row, column) of the ones of ``mask``, row-major (PEFT's ``torch.where(mask == 1.0)``)."""
    rows, cols = torch.where(mask == 1.0)
    return torch.stack([rows, cols]).to(torch.int32)


def sparse_delta(indices: Tensor, values: Tensor, shape: tuple[int, int], scaling: float = 1.0) -> Tensor:
    """Dense ``dW`` (d_out, d_in): ``values * scaling`` at ``indices``, zero elsewhere (differentiable in
    ``values``; the same numbers as PEFT's densified ``sparse_coo_tensor``, whose indices are unique)."""
    idx = indices.long()
    delta = torch.zeros(shape, device=values.device, dtype=values.dtype)
    return delta.index_put((idx[0], idx[1]), values * scaling if scaling != 1 else values)
