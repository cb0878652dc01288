"""The forward math of selective adapters on large weights, without a second copy of those weights.

A selective adapter holds a delta ``D`` for some entries of a frozen base weight ``W0``. The layer output is
``op(x, W0 + D, b)``. Written naively, autograd keeps ``W0 + D`` (a full copy of the weight) alive from the
forward pass to the backward pass, in every layer: a second copy of the model during training.
``ReparamOp`` forms ``W0 + D`` in a per-call temporary, runs the op, and frees it; the backward pass builds
it again. What stays saved is the layer input (which the base layer saves anyway) and the adapter's own
tensors (the selected values), so training memory is the base model, the activations and the selected
entries (with their gradients and optimizer state).

``op`` is linear in the weight (Linear, GPT-2 Conv1D, convolutions, embeddings), so the same function also
gives an adapter's additive contribution ``op(x, D, Db)`` when several adapters share a layer.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...targeting import Conv1D


class LinearOp:
    """``y = x W^T + b`` with the weight gradient ``g^T x`` and input gradient ``g W`` written out."""

    def forward(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        return F.linear(x, w, b)

    def backward(self, x: Tensor, w: Tensor, b: Tensor | None, g: Tensor, need_x: bool, need_b: bool):
        g2 = g.reshape(-1, g.shape[-1])
        gx = g.matmul(w.to(g.dtype)) if need_x else None
        gw = g2.t().mm(x.reshape(-1, x.shape[-1]).to(g.dtype))
        return gx, gw, (g2.sum(0) if need_b else None)


class Conv1DOp:
    """GPT-2's Conv1D: ``y = x W + b`` with ``W`` stored (d_in, d_out)."""

    def forward(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        y = x2.mm(w) if b is None else torch.addmm(b, x2, w)
        return y.view(*x.shape[:-1], w.shape[1])

    def backward(self, x: Tensor, w: Tensor, b: Tensor | None, g: Tensor, need_x: bool, need_b: bool):
        g2 = g.reshape(-1, g.shape[-1])
        gx = g.matmul(w.t().to(g.dtype)) if need_x else None
        gw = x.reshape(-1, x.shape[-1]).to(g.dtype).t().mm(g2)
        return gx, gw, (g2.sum(0) if need_b else None)


class RecomputeOp:
    """Any op linear in its weight (convolutions, embeddings): the backward pass re-runs it under autograd."""

    def __init__(self, fn: Callable[[Tensor, Tensor, Tensor | None], Tensor]) -> None:
        self.fn = fn

    def forward(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        return self.fn(x, w, b)

    def backward(self, x: Tensor, w: Tensor, b: Tensor | None, g: Tensor, need_x: bool, need_b: bool):
        with torch.enable_grad():
            xr = x.detach().requires_grad_(need_x)
            wr = w.detach().requires_grad_(True)
            br = None if b is None else b.detach().requires_grad_(need_b)
            inputs = [t for t, need in ((xr, need_x), (wr, True), (br, need_b)) if t is not None and need]
            grads = list(torch.autograd.grad(self.fn(xr, wr, br), inputs, g))
        gx = grads.pop(0) if need_x else None
        gw = grads.pop(0)
        gw = gw.to_dense() if gw.is_sparse else gw
        return gx, gw, (grads.pop(0) if need_b and b is not None else None)


def weight_op(base: nn.Module) -> Any | None:
    """The op of a layer whose output is linear in its weight, or None (other modules run generically).

    Subclasses that override ``forward`` (quantized layers and the like) are not assumed to be linear.
    """
    cls = type(base)
    if isinstance(base, nn.Linear) and cls.forward is nn.Linear.forward:
        return LinearOp()
    if isinstance(Conv1D, type) and isinstance(base, Conv1D) and cls.forward is Conv1D.forward:
        return Conv1DOp()
    if isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and cls.forward in (
        nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward
    ):
        return RecomputeOp(base._conv_forward)
    if isinstance(base, nn.Embedding) and cls.forward is nn.Embedding.forward and base.max_norm is None:
        def embed(ids: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
            return F.embedding(ids, w, base.padding_idx, None, base.norm_type, base.scale_grad_by_freq, base.sparse)

        return RecomputeOp(embed)
    return None


def channel_shape(base: nn.Module, ndim: int) -> tuple[int, ...]:
    """How a per-channel bias broadcasts over the output: channels on axis 1 for convolutions, else last."""
    if isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.GroupNorm)):
        return (-1,) + (1,) * (ndim - 2)
    return (-1,)


class DeltaBuilder:
    """How one adapter turns its tensors ``theta`` into the delta of one base parameter (see ``ReparamOp``).

    ``effective(theta, w0)`` is ``w0 + D(theta)`` (or ``D`` when ``w0`` is None), outside autograd;
    ``vjp(theta, grad_D)`` maps the gradient of the dense delta back onto ``theta``.
    """

    def __init__(self, adapter: Any, pname: str, state: Any) -> None:
        self.adapter, self.pname, self.state = adapter, pname, state

    def effective(self, theta: tuple[Tensor, ...], w0: Tensor | None) -> Tensor:
        a, p = self.adapter, self.pname
        if a.formats[p] == "sparse":  # scatter the values into a copy of w0: one temporary, no dense D
            vals = theta[0]
            out = torch.zeros(a.shapes[p], dtype=vals.dtype, device=vals.device) if w0 is None else w0.clone()
            out.view(-1).index_add_(0, a.index(p), vals.to(out.dtype))
            return out
        d = a.dense(p, theta, self.state)
        return d if w0 is None else w0 + d.to(w0.dtype)

    def vjp(self, theta: tuple[Tensor, ...], grad: Tensor) -> tuple[Tensor, ...]:
        a, p = self.adapter, self.pname
        if a.formats[p] == "sparse":
            return (grad.reshape(-1).index_select(0, a.index(p)).to(theta[0].dtype),)
        with torch.enable_grad():
            th = tuple(t.detach().requires_grad_(True) for t in theta)
            d = a.dense(p, th, self.state)
            return torch.autograd.grad(d, th, grad.to(d.dtype))


class ReparamOp(torch.autograd.Function):
    """``op(x, w0 + D(theta), bias)`` keeping neither ``w0 + D`` nor ``D`` for the backward pass."""

    @staticmethod
    def forward(ctx, x, bias, op, w0, builder, *theta):  # type: ignore[override]
        with torch.no_grad():
            w = builder.effective(theta, w0)
            y = op.forward(x, w.to(x.dtype) if x.is_floating_point() else w, bias)
        ctx.op, ctx.builder, ctx.has_w0 = op, builder, w0 is not None
        device = x.device.type
        # the backward pass computes in the forward pass's autocast state (mixed-precision training)
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        ctx.save_for_backward(x, bias, w0, *theta)
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, bias, w0, *theta = ctx.saved_tensors
        need_x, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        device, dtype, enabled = ctx.autocast
        with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            w = ctx.builder.effective(tuple(theta), w0 if ctx.has_w0 else None)
            w = w.to(x.dtype) if x.is_floating_point() else w
            gx, gw, gb = ctx.op.backward(x, w, bias, grad, need_x, need_b)
            del w
        gtheta = ctx.builder.vjp(tuple(theta), gw)
        return (gx, None if gb is None else gb.to(bias.dtype), None, None, None, *gtheta)
