"""BEFT's math as pure functions: a per-output-channel bias added to a linear layer's output."""

from __future__ import annotations

from typing import Any

from torch import Tensor


def beft_add(out: Tensor, beft_bias: Tensor) -> Tensor:
    """``out + b_v`` (in place into ``out``, which the caller owns): ``beft_bias`` (1, d_out) broadcast over the
    leading axes of ``out`` (..., d_out). Computed in the promoted dtype and stored in ``out``'s, as PEFT's
    ``(out + b).to(out.dtype)``."""
    return out.add_(beft_bias.reshape(-1))


def beft_fused(op: Any, x: Tensor, weight: Tensor, base_bias: Tensor | None, beft_bias: Tensor) -> Tensor:
    """The base layer and the adapter in one op: ``op(x, W, b0 + b_v)`` (``b_v`` alone when the layer has no
    bias); ``op`` is the layer's weight op (``selective.functional.weight_op``: Linear or GPT-2 Conv1D)."""
    b = beft_bias.reshape(-1)
    return op.forward(x, weight, b if base_bias is None else base_bias + b)


def beft_merge_bias(base_bias: Tensor, beft_bias: Tensor) -> Tensor:
    """The merged bias ``b0 + b_v`` (d_out,)."""
    return base_bias + beft_bias.reshape(-1).to(base_bias.dtype)


def beft_unmerge_bias(merged_bias: Tensor, beft_bias: Tensor) -> Tensor:
    """``b0`` back from the merged bias (the wrapper corrects the last bits, see ``layers.py``)."""
    return merged_bias - beft_bias.reshape(-1).to(merged_bias.dtype)
