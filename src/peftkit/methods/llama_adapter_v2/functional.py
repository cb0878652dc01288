"""LLaMA-Adapter V2's weight math as pure functions: bias and scale tuning, y = s ⊙ (W x + b0 + b), and its
re-parameterization into the layer (``W' = diag(s) W``, ``b0' = s ⊙ (b0 + b)``)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..ssf import channel_shape


def bias_scale(out: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """``s ⊙ (out + b)`` with the channels of ``out`` last (``out``: the layer's own output, ``W x + b0``)."""
    return (out if bias is None else out + bias) * scale


def merge_weight(weight: Tensor, scale: Tensor, axis: int) -> Tensor:
    """``diag(s) W``: the weight scaled along its output-channel ``axis``."""
    return weight * scale.reshape(channel_shape(weight, axis))


def unmerge_weight(weight: Tensor, scale: Tensor, axis: int) -> Tensor:
    """``W' / s`` along ``axis`` (entries scaled by 0 come back as 0; the wrapper's exact-restore record fills them)."""
    scale = scale.reshape(channel_shape(weight, axis))
    return torch.where(scale == 0, torch.zeros_like(weight), weight / scale)


def merge_bias(bias0: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """``s ⊙ (b0 + b)``."""
    return (bias0 if bias is None else bias0 + bias) * scale


def unmerge_bias(merged: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """``b0' / s - b`` (0 where ``s`` is 0; the exact-restore record fills those)."""
    value = torch.where(scale == 0, torch.zeros_like(merged), merged / scale)
    return value if bias is None else value - bias
