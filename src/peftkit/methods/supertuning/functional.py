"""Super-Tuning's math as pure functions on tensors (no modules, no state).

Layout: the weight as ``nn.Linear`` holds it, ``W0`` (d_out, d_in); the support is ``indices`` (k,), flat
row-major positions into it (int32 as stored, int64 to index), and ``values`` (k,) the trained entries.
"""

from __future__ import annotations

import torch
from torch import Tensor


def num_trainable(numel: int, sparsity: float) -> int:
    """``k = int(numel (1 - sparsity))``, PEFT's count (the same float arithmetic)."""
    return int(numel * (1 - sparsity))


def select_support(w0: Tensor, k: int, largest: bool) -> Tensor:
    """The ``k`` flat positions of the largest (or smallest) ``|W0|`` entries, int32 (PEFT's ``topk`` order)."""
    _, indices = torch.topk(w0.abs().flatten(), k=k, largest=largest)
    return indices.to(torch.int32)


def sparse_delta(values: Tensor, indices: Tensor, shape: tuple[int, int]) -> Tensor:
    """The dense (d_out, d_in) matrix holding ``values`` at ``indices`` (repeated positions add up)."""
    flat = values.new_zeros(shape[0] * shape[1])
    return flat.scatter_add(0, indices.to(torch.int64), values).view(shape)


def compose(w0: Tensor, values: Tensor, indices: Tensor) -> Tensor:
    """``W0 + S`` (d_out, d_in) in one scatter into a copy of ``W0`` (PEFT's forward weight; differentiable in
    ``values`` only: the gradient is the dense weight gradient gathered at ``indices``)."""
    return w0.reshape(-1).scatter_add(0, indices.to(torch.int64), values).view(w0.shape)


def sparse_matvec(x: Tensor, values: Tensor, indices: Tensor, d_in: int, d_out: int) -> Tensor:
    """``x @ S^T`` for the sparse ``S`` (``sparse_delta``) without forming it: O(tokens k), not O(tokens d_in d_out).
    ``x`` (..., d_in) -> (..., d_out)."""
    idx = indices.to(torch.int64)
    rows, cols = idx // d_in, idx % d_in
    contrib = x.index_select(-1, cols) * values  # (..., k)
    out = x.new_zeros(*x.shape[:-1], d_out)
    return out.index_add(-1, rows, contrib)


def lora_delta(lora_a: Tensor, lora_b: Tensor, scale: float) -> Tensor:
    """``scale B A`` (d_out, d_in) with ``A`` (r, d_in), ``B`` (d_out, r)."""
    return scale * (lora_b @ lora_a)
