"""LoRA-FA's math as pure functions, and the autograd function of its training path.

Layouts: ``A`` (r, d_in), ``B`` (d_out, r); a base weight ``W`` (d_out, d_in), or (d_in, d_out) when ``transposed``
(GPT-2's Conv1D). ``h = x A^T`` (n, r) is the only activation the adapter needs for its gradient:

    dL/dB = s (dL/dy)^T h,      dL/dx = dL/dy W + s (dL/dy B) A,      dL/dA: none (A is frozen)

so the layer input ``x`` (n, d_in), which LoRA keeps for ``dL/dA = s (dL/dy B)^T x``, is not kept.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..lora.kernels import skinny_mm


@torch.no_grad()
def init_factors(A: Tensor, B: Tensor, init: bool | str) -> None:
    """LoRA's initialisation of the pair: True: A Kaiming-uniform (a = sqrt(5), nn.Linear's), B zero; ``"gaussian"``:
    A normal with std 1 / r, B zero; False: both Kaiming-uniform (not the identity; for tests)."""
    if init == "gaussian":
        nn.init.normal_(A, std=1 / A.shape[0])
    else:
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    if init is False:
        nn.init.kaiming_uniform_(B, a=math.sqrt(5))
    else:
        nn.init.zeros_(B)


def lowrank_output(x: Tensor, A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """The reference formula ``s B A x`` on the last axis of ``x``: ``s (x A^T) B^T``. With ``A`` frozen, autograd
    keeps ``h = x A^T`` (for B's gradient) and not ``x``."""
    return F.linear(F.linear(x, A), B) * scaling


class FrozenALinear(torch.autograd.Function):
    """``y = base(x) + s (xd A^T) B^T`` in one pass for a Linear / Conv1D base, ``A`` and ``W`` frozen.

    ``xd`` is the adapter's input (``x`` after dropout) or None when it is ``x`` itself. Saved for backward:
    ``W``, ``A``, ``B`` (parameters: no new memory) and ``h = xd A^T`` (n, r); never ``x`` nor ``xd``. The update
    accumulates in place into the fresh base output; in backward the adapter's input gradient accumulates in place
    into the base's.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, xd: Tensor | None, w: Tensor, bias: Tensor | None, A: Tensor, B: Tensor,
                scaling: float, transposed: bool) -> Tensor:
        if transposed:
            out = torch.addmm(bias, x, w) if bias is not None else x @ w
        else:
            out = F.linear(x, w, bias)
        ctx.same_input = xd is None
        h = skinny_mm(x if xd is None else xd, A.t())  # (n, r)
        out.addmm_(h, B.t(), alpha=scaling)
        ctx.scaling, ctx.transposed, ctx.has_bias = scaling, transposed, bias is not None
        ctx.save_for_backward(w, A, B, h)
        return out

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        w, A, B, h = ctx.saved_tensors
        need_x, need_xd, need_w, need_b, need_A, need_B = ctx.needs_input_grad[:6]
        if need_w or need_A:  # the callers route a trainable W or A to the reference path
            raise RuntimeError("FrozenALinear keeps no input: the base weight and lora_A must be frozen")
        grad_x = grad_xd = grad_B = None
        grad_h = skinny_mm(g, B).mul_(ctx.scaling) if (need_x or need_xd) else None  # (n, r)
        if need_x:
            grad_x = g @ (w.t() if ctx.transposed else w)
            if ctx.same_input:
                grad_x.addmm_(grad_h, A)
        if need_xd and not ctx.same_input:
            grad_xd = grad_h @ A
        if need_B:
            grad_B = skinny_mm(g.t(), h).mul_(ctx.scaling)
        grad_b = g.sum(0) if ctx.has_bias and need_b else None
        return grad_x, grad_xd, None, grad_b, None, grad_B, None, None
