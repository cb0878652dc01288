"""VB-LoRA's weight math as pure functions (PEFT's arithmetic, step for step)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def mix_vectors(logits: Tensor, bank: Tensor, topk: int) -> Tensor:
    """Each sub-vector as the softmax-weighted sum of its top-k bank vectors.

    ``logits`` (..., num_vectors), ``bank`` (num_vectors, b) -> (..., b): ``sum_{j in topk(l)} softmax(l_topk)_j v_j``.
    """
    top, indices = logits.topk(topk, dim=-1)
    weights = F.softmax(top, dim=-1)
    return (weights.unsqueeze(-1) * bank[indices]).sum(-2)


def vblora_factors(logits_a: Tensor, logits_b: Tensor, bank: Tensor, topk: int) -> tuple[Tensor, Tensor]:
    """``A`` (r, d_in) and ``B`` (d_out, r) from the logits ``(r, d_in / b, n)`` and ``(d_out / b, r, n)``."""
    a = mix_vectors(logits_a, bank, topk).reshape(logits_a.shape[0], -1)
    # (d_out / b, r, b) -> (d_out / b, b, r) -> (d_out, r)
    b = mix_vectors(logits_b, bank, topk).transpose(1, 2).reshape(-1, logits_b.shape[1])
    return a, b


def index_dtype(num_vectors: int) -> torch.dtype:
    """The smallest integer type PEFT stores top-k indices in for a bank of ``num_vectors`` vectors."""
    if num_vectors < 2**8:
        return torch.uint8
    if num_vectors < 2**15:
        return torch.int16
    if num_vectors < 2**31:
        return torch.int32
    return torch.int64


def logits_to_topk(logits: Tensor, topk: int, num_vectors: int) -> tuple[Tensor, Tensor]:
    """PEFT's ``save_only_topk_weights`` form: the top-k indices and the first k-1 softmax weights."""
    top, indices = logits.topk(topk)
    return indices.to(index_dtype(num_vectors)), torch.softmax(top, dim=-1)[..., :-1].contiguous()


def topk_to_logits(indices: Tensor, weights: Tensor, num_vectors: int) -> Tensor:
    """Logits that select the same vectors with the same weights: ``log w`` at the indices, -inf elsewhere
    (the last weight is ``1 - sum`` of the saved ones), as PEFT rebuilds them on load."""
    weights = torch.cat([weights, 1 - weights.sum(-1, keepdim=True)], dim=-1)
    full = torch.full((*weights.shape[:-1], num_vectors), float("-inf"), dtype=weights.dtype, device=weights.device)
    return full.scatter(-1, indices.long(), torch.log(weights))
