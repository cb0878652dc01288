"""Autograd functions for the LoRA hot path: fewer full-size temporaries than composing aten ops.

On CPU every fresh (tokens x features) allocation costs page faults on top of the memory pass.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class LoraLinear(torch.autograd.Function):
    """``y = base(x) + s (xd A^T) B^T`` for a Linear (weight (d_out, d_in)) or Conv1D (weight (d_in, d_out)).

    ``xd`` is the adapter's input (``x`` after dropout), or None when it is ``x`` itself. The
    update accumulates in place into the fresh base output, and in backward the low-rank input gradient
    accumulates in place into the base input gradient (when ``xd`` is None) instead of autograd adding two
    (n, d_in) tensors.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, xd: Tensor | None, w: Tensor, bias: Tensor | None, A: Tensor, B: Tensor,
                scaling: float, transposed: bool) -> Tensor:
        if transposed:
            out = torch.addmm(bias, x, w) if bias is not None else x @ w
        else:
            out = torch.nn.functional.linear(x, w, bias)
        ctx.same_input = xd is None
        xd = x if xd is None else xd
        h = xd @ A.t()  # (n, r)
        out.addmm_(h, B.t(), alpha=scaling)
        ctx.scaling, ctx.transposed, ctx.has_bias = scaling, transposed, bias is not None
        ctx.save_for_backward(x, w, A, B, h, *(() if ctx.same_input else (xd,)))
        return out

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x, w, A, B, h, *rest = ctx.saved_tensors
        xd = x if ctx.same_input else rest[0]
        need_x, need_xd, need_w, need_b, need_A, need_B = ctx.needs_input_grad[:6]
        grad_h = torch.mm(g, B).mul_(ctx.scaling)  # (n, r)
        grad_A = grad_h.t() @ xd if need_A else None
        grad_B = torch.mm(g.t(), h).mul_(ctx.scaling) if need_B else None
        grad_x = grad_xd = None
        if need_x:
            grad_x = g @ (w.t() if ctx.transposed else w)
            if ctx.same_input:
                grad_x.addmm_(grad_h, A)
        if need_xd and not ctx.same_input:
            grad_xd = grad_h @ A
        grad_w = (x.t() @ g if ctx.transposed else g.t() @ x) if need_w else None
        grad_b = g.sum(0) if ctx.has_bias and need_b else None
        return grad_x, grad_xd, grad_w, grad_b, grad_A, grad_B, None, None


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


def stack_lora(adapters: list) -> tuple[Tensor, Tensor]:
    """Stacked ``A`` (n + 1, r_max, d_in) and ``s B^T`` (n + 1, r_max, d_out) of linear LoRA adapters
    (objects with ``lora_A``, ``lora_B``, ``scaling``), ranks zero-padded to the largest; the last slot is
    all zeros (rows without an adapter). Differentiable when autograd is on."""
    r_max = max(a.lora_A.shape[0] for a in adapters)
    A0, B0 = adapters[0].lora_A, adapters[0].lora_B
    d_in, d_out = A0.shape[1], B0.shape[0]
    zA, zB = A0.new_zeros(r_max, d_in), B0.new_zeros(r_max, d_out)
    if torch.is_grad_enabled() and any(a.lora_A.requires_grad or a.lora_B.requires_grad for a in adapters):
        As = torch.stack([torch.cat([a.lora_A, zA[a.lora_A.shape[0]:]], 0) for a in adapters] + [zA])
        Bt = torch.stack([torch.cat([a.lora_B.t() * a.scaling, zB[a.lora_A.shape[0]:]], 0) for a in adapters] + [zB])
        return As, Bt
    As = A0.new_zeros(len(adapters) + 1, r_max, d_in)
    Bt = B0.new_zeros(len(adapters) + 1, r_max, d_out)
    for k, a in enumerate(adapters):
        r = a.lora_A.shape[0]
        As[k, :r] = a.lora_A
        Bt[k, :r] = a.lora_B.t() * a.scaling
    return As, Bt
