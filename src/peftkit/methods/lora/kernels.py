"""Autograd functions for the LoRA hot path: fewer full-size temporaries than composing aten ops.

On CPU every fresh (tokens x features) allocation costs page faults on top of the memory pass.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def skinny_mm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for a product with one thin side (a rank-r factor), computed as ``(b^T a^T)^T``: the
    result is a transposed view.

    Measured with torch 2.13's CPU BLAS (1024 tokens, r = 8, one thread): ``g @ B`` for a (1024, 1536)
    ``g`` takes 1.28 ms as written and 0.39 ms transposed, ``g^T @ h`` (the gradient of ``B``) 3.06 ms
    against 0.40 ms, ``x @ A^T`` 0.13 against 0.10 ms; the (r, n) x (n, d) products are fast either way.
    At r = 16 and 32 only ``g^T @ h`` still gains (1.2-1.6x), the others are within a few percent either
    way; at r = 64 the forms take the same time (``benchmarks/bench_thin_products.py --rank R``).
    The two forms may round differently (BLAS picks another kernel), within float tolerance.
    """
    return torch.mm(b.t(), a.t()).t()


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
        h = skinny_mm(xd, A.t())  # (n, r)
        out.addmm_(h, B.t(), alpha=scaling)
        ctx.scaling, ctx.transposed, ctx.has_bias = scaling, transposed, bias is not None
        # keep x only for what reads it: the base weight's gradient, or A's when x is A's input; with dropout,
        # A's gradient reads xd, and a frozen base never needs x (keeping it held one (n, d_in) tensor per layer)
        need_w, need_A = ctx.needs_input_grad[2], ctx.needs_input_grad[4]
        keep_x = need_w or (ctx.same_input and need_A)
        keep_xd = need_A and not ctx.same_input
        ctx.save_for_backward(x if keep_x else None, w, A, B, h, xd if keep_xd else None)
        return out

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x, w, A, B, h, xd = ctx.saved_tensors
        xd = x if ctx.same_input else xd
        need_x, need_xd, need_w, need_b, need_A, need_B = ctx.needs_input_grad[:6]
        grad_h = skinny_mm(g, B).mul_(ctx.scaling)  # (n, r)
        grad_A = grad_h.t() @ xd if need_A else None
        grad_B = skinny_mm(g.t(), h).mul_(ctx.scaling) if need_B else None
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


def row_dot(g: Tensor, t: Tensor, block: int = 256) -> Tensor:
    """``sum_n g[n] * t[n]`` (one value per column) of two (n, d) tensors, reduced in row blocks that stay
    in cache instead of through an (n, d) temporary."""
    if torch.compiler.is_compiling():
        return (g * t).sum(0)  # the compiler fuses this into one pass
    out = torch.zeros(g.shape[1], dtype=g.dtype, device=g.device)
    for i in range(0, g.shape[0], block):
        out += torch.linalg.vecdot(g[i : i + block], t[i : i + block], dim=0)
    return out


class DoraLinear(torch.autograd.Function):
    """DoRA on a Linear / Conv1D base in one pass: ``y = scale * (x W0^T + s (xd A^T) B^T) + b``.

    ``scale = m / ||W0 + s B A||`` (d_out,) comes in with the norm already detached, so its gradient is
    ``sum_n g * u`` with ``u = x W0^T + s xd A^T B^T`` (saved, (n, d_out)). Against LoRA followed by a
    generic ``t * scale + shift``, backward never forms ``g * scale``: the scale folds into the small
    factors (``B``, the (d_out, r) gradient of ``B``) and into ``W0`` for the input gradient when
    ``W0`` is the smaller of the two (``n > d_in``); the bias is added outside the scale, so no
    ``(1 - scale) b`` shift and no ``g.sum(0)`` for its gradient (only when the bias itself trains).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, xd: Tensor | None, w: Tensor, bias: Tensor | None, A: Tensor, B: Tensor,
                scale: Tensor, scaling: float, transposed: bool) -> Tensor:
        u = x @ w if transposed else x @ w.t()  # (n, d_out), without the bias
        ctx.same_input = xd is None
        xd = x if xd is None else xd
        h = skinny_mm(xd, A.t())  # (n, r)
        u.addmm_(h, B.t(), alpha=scaling)
        out = torch.addcmul(bias, u, scale) if bias is not None else u * scale
        ctx.scaling, ctx.transposed, ctx.has_bias = scaling, transposed, bias is not None
        ctx.save_for_backward(x, w, A, B, h, u, scale, *(() if ctx.same_input else (xd,)))
        return out

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x, w, A, B, h, u, scale, *rest = ctx.saved_tensors
        xd = x if ctx.same_input else rest[0]
        need_x, need_xd, need_w, need_b, need_A, need_B, need_scale = ctx.needs_input_grad[:7]
        s, col = ctx.scaling, scale[:, None]
        grad_h = skinny_mm(g, B * col).mul_(s)  # (n, r): (g * scale) B s
        grad_A = grad_h.t() @ xd if need_A else None
        grad_B = skinny_mm(g.t(), h).mul_(col * s) if need_B else None
        gu = None  # g * scale, formed only where scaling the weight would cost more
        grad_x = grad_xd = None
        if need_x:
            if x.shape[0] > x.shape[1]:  # n > d_in: the (d_out, d_in) weight is the smaller operand
                grad_x = g @ (w * scale).t() if ctx.transposed else g @ (w * col)
            else:
                gu = g * scale
                grad_x = gu @ (w.t() if ctx.transposed else w)
            if ctx.same_input:
                grad_x.addmm_(grad_h, A)
        if need_xd and not ctx.same_input:
            grad_xd = grad_h @ A
        grad_w = None
        if need_w:
            gu = g * scale if gu is None else gu
            grad_w = x.t() @ gu if ctx.transposed else gu.t() @ x
        grad_b = g.sum(0) if ctx.has_bias and need_b else None
        grad_scale = row_dot(g, u) if need_scale else None
        return grad_x, grad_xd, grad_w, grad_b, grad_A, grad_B, grad_scale, None, None


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
        grad_scale = row_dot(g, t, ScaleShift.BLOCK) if ctx.needs_input_grad[1] else None
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
