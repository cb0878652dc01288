"""RoAd's weight math as pure functions: the rotation's two diagonals, applying it element-wise, its dense form.

Layout (as Hugging Face PEFT): a vector of width ``d`` is split into groups of ``g = group_size``; within a group,
element ``i < g/2`` is paired with element ``i + g/2``. The rotation is given by two vectors of width ``d``,
``first`` (the 2x2 blocks' diagonal) and ``second`` (their off-diagonal), and acts on a pair ``(x1, x2)`` as

    y1 = first_1 x1 - second_1 x2,     y2 = second_2 x1 + first_2 x2

(``first_1`` / ``second_1``: the entries at ``i``, ``first_2`` / ``second_2``: at ``i + g/2``), i.e.
``y = x * first + rotate_half(x) * second`` with ``rotate_half(x1, x2) = (-x2, x1)`` per group. The kernels
take the off-diagonal signed, ``q = (-second_1, second_2)`` (``signed``): ``y = x * first + swap(x) * q``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import VARIANTS


def param_size(variant: str, d_out: int) -> int:
    """Length of ``road_theta`` (and of ``road_alpha``) on a layer with ``d_out`` outputs."""
    return {"road_1": d_out // 2, "road_2": d_out, "road_4": 2 * d_out}[variant]


def road_cols(variant: str, group_size: int, theta: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
    """``(first, second)``, each (d_out,): ``alpha cos(theta)`` and ``alpha sin(theta)`` laid out per element.

    road_1: theta, alpha (d_out / 2,), one value per pair (shared by both halves of a group); road_2: (d_out,),
    one per element; road_4: (2 d_out,), per group ``g`` values for the diagonal then ``g`` for the off-diagonal
    (cos of the first angles with the first scales, sin of the second angles with the second scales).
    """
    if variant == "road_1":
        half = group_size // 2
        cos = theta.cos().reshape(-1, 1, half).expand(-1, 2, half).reshape(-1)
        sin = theta.sin().reshape(-1, 1, half).expand(-1, 2, half).reshape(-1)
        a = alpha.reshape(-1, 1, half).expand(-1, 2, half).reshape(-1)
        return a * cos, a * sin
    if variant == "road_2":
        return alpha * theta.cos(), alpha * theta.sin()
    if variant == "road_4":
        t = theta.reshape(-1, 2, group_size)
        a = alpha.reshape(-1, 2, group_size)
        return a[:, 0].reshape(-1) * t[:, 0].cos().reshape(-1), a[:, 1].reshape(-1) * t[:, 1].sin().reshape(-1)
    raise ValueError(f"RoadConfig.variant: expected one of {VARIANTS}, got {variant!r}")


def road_apply(h: Tensor, first: Tensor, second: Tensor, group_size: int) -> Tensor:
    """The reference formula (PEFT's): ``h * first + rotate_half(h) * second`` on the last axis of ``h``."""
    hg = h.reshape(-1, 2, group_size // 2)
    rotate_half = torch.stack((-hg[:, 1], hg[:, 0]), dim=1).reshape(h.shape)
    return h * first + rotate_half * second


def road_matrix(first: Tensor, second: Tensor, group_size: int) -> Tensor:
    """The dense rotation ``R`` (d, d) with ``R h`` = the element-wise rotation of ``h`` (tests, documentation)."""
    d, half = first.shape[0], group_size // 2
    idx = torch.arange(d, device=first.device).reshape(-1, 2, half)
    lo, hi = idx[:, 0].reshape(-1), idx[:, 1].reshape(-1)
    r = torch.diag(first)
    r[lo, hi] = -second[lo]
    r[hi, lo] = second[hi]
    return r


def inverse_cols(first: Tensor, second: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """``(first, second)`` of ``R^-1``: each 2x2 block ``[[f1, -s1], [s2, f2]]`` inverts to
    ``[[f2, s1], [-s2, f1]] / (f1 f2 + s1 s2)``; a singular block (a zero scale) gives zeros."""
    half = group_size // 2
    f, s = first.reshape(-1, 2, half), second.reshape(-1, 2, half)
    det = f[:, 0] * f[:, 1] + s[:, 0] * s[:, 1]
    inv = torch.where(det == 0, torch.zeros_like(det), 1 / torch.where(det == 0, torch.ones_like(det), det))
    inv = inv.unsqueeze(1)
    return (f.flip(1) * inv).reshape(first.shape), (-s * inv).reshape(second.shape)


def signed(second: Tensor, group_size: int) -> Tensor:
    """``q``, the off-diagonal as the kernels take it: ``-second`` on each group's first half, so that
    ``R h = h * first + swap(h) * q`` (``swap`` exchanges the halves of each group)."""
    half = group_size // 2
    s = second.unflatten(-1, (-1, 2, half))
    return torch.stack((-s[..., 0, :], s[..., 1, :]), dim=-2).flatten(-3)


def _halves(t: Tensor, half: int) -> tuple[Tensor, Tensor]:
    v = t.unflatten(-1, (-1, 2, half))
    return v[..., 0, :], v[..., 1, :]


def _rotate(h: Tensor, first: Tensor, q: Tensor, half: int) -> Tensor:
    """``h * first + swap(h) * q``: one contiguous product, then two half-width multiply-adds in place (on CPU
    about 3x fewer passes than the formula's negation, stack and two products)."""
    y = h * first
    y1, y2 = _halves(y, half)
    x1, x2 = _halves(h, half)
    q1, q2 = _halves(q, half)
    y1.addcmul_(x2, q1)
    y2.addcmul_(x1, q2)
    return y


class RoadRotate(torch.autograd.Function):
    """``R h`` element-wise. Autograd keeps only ``h`` (and only when the rotation trains), not the swapped copy
    of ``h`` the plain formula keeps; the backward is ``R^T g = g * first + swap(g * q)`` and the per-element
    reductions for the two diagonals (summed over the axes along which ``first`` / ``q`` broadcast)."""

    @staticmethod
    def forward(ctx, h: Tensor, first: Tensor, q: Tensor, half: int) -> Tensor:  # type: ignore[override]
        grow = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        ctx.half = half
        ctx.save_for_backward(h if grow else None, first, q)
        return _rotate(h, first, q, half)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        h, first, q = ctx.saved_tensors
        half = ctx.half
        g1, g2 = _halves(g, half)
        dh = dfirst = dq = None
        if ctx.needs_input_grad[0]:  # R^T g: dx1 = g1 f1 + g2 q2, dx2 = g2 f2 + g1 q1
            dh = g * first
            d1, d2 = _halves(dh, half)
            q1, q2 = _halves(q, half)
            d1.addcmul_(g2, q2)
            d2.addcmul_(g1, q1)
        if ctx.needs_input_grad[1]:
            dfirst = (g * h).sum_to_size(first.shape)
        if ctx.needs_input_grad[2]:  # g * swap(h)
            t = torch.empty(g.shape, dtype=g.dtype, device=g.device)
            t1, t2 = _halves(t, half)
            x1, x2 = _halves(h, half)
            torch.mul(g1, x2, out=t1)
            torch.mul(g2, x1, out=t2)
            dq = t.sum_to_size(q.shape)
        return dh, dfirst, dq, None


def rotate(h: Tensor, first: Tensor, q: Tensor, group_size: int) -> Tensor:
    """``R h`` on the last axis of ``h``, given ``first`` and ``q = signed(second)`` ((d,), or per row:
    (B, 1, ..., d)); through ``RoadRotate`` when autograd records."""
    half = group_size // 2
    if torch.is_grad_enabled() and (h.requires_grad or first.requires_grad or q.requires_grad):
        return RoadRotate.apply(h, first, q, half)
    return _rotate(h, first, q, half)


def rotate_weight(weight: Tensor, first: Tensor, q: Tensor, group_size: int, out_axis: int) -> Tensor:
    """``R W`` with ``W``'s output axis ``out_axis``: the last (GPT-2 Conv1D's (d_in, d_out), a bias) or 0
    (nn.Linear's (d_out, d_in))."""
    if out_axis == weight.dim() - 1:
        return rotate(weight, first, q, group_size)
    return rotate(weight.t(), first, q, group_size).t().contiguous()
