"""Autograd functions for the LoRA hot path: fewer full-size temporaries than composing aten ops.

On CPU every fresh (tokens x features) allocation costs page faults on top of the memory pass.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class ScaleShift(torch.autograd.Function):
    """``y = t * scale + shift`` over the rows of ``t`` (n, d).

    Backward allocates only the gradient of ``t``; the scale gradient ``sum_n g * t`` is reduced in
    row blocks that stay in cache instead of through a second (n, d) temporary.
    """

    BLOCK = 256

    @staticmethod
    def forward(ctx: Any, t: Tensor, scale: Tensor, shift: Tensor | None) -> Tensor:
        ctx.save_for_backward(t, scale)
        ctx.has_shift = shift is not None
        return torch.addcmul(shift, t, scale) if shift is not None else t * scale

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        t, scale = ctx.saved_tensors
        grad_t = g * scale if ctx.needs_input_grad[0] else None
        grad_scale = None
        if ctx.needs_input_grad[1] and torch.compiler.is_compiling():
            grad_scale = (g * t).sum(0)  # the compiler fuses this into one pass
        elif ctx.needs_input_grad[1]:
            grad_scale = torch.zeros_like(scale)
            for i in range(0, g.shape[0], ScaleShift.BLOCK):
                grad_scale += torch.linalg.vecdot(g[i : i + ScaleShift.BLOCK], t[i : i + ScaleShift.BLOCK], dim=0)
        grad_shift = g.sum(0) if ctx.has_shift and ctx.needs_input_grad[2] else None
        return grad_t, grad_scale, grad_shift
