"""DiffFit's math as pure functions on tensors: the scaled residual branch and gamma folded into its projection.

Layouts: ``gamma`` (d_out,), one factor per output channel of the branch's last projection. Its weight is
``W`` (d_out, d_in) for Linear, (d_out, c_in / groups, *k) for convolutions, or (d_in, d_out) for GPT-2's
Conv1D (``transposed``); the output carries channels last (Linear, Conv1D) or on axis 1 (convolutions).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _out_view(gamma: Tensor, w: Tensor, transposed: bool) -> Tensor:
    """``gamma`` shaped to broadcast over ``w``'s output channels."""
    if transposed:
        return gamma.reshape(1, -1)
    return gamma.reshape((-1,) + (1,) * (w.dim() - 1))


def scale_output(y: Tensor, gamma: Tensor, channel_axis_last: bool) -> Tensor:
    """``gamma * y`` over the output channels (the scaled branch ``gamma * f(x)``)."""
    view = gamma.reshape(-1) if channel_axis_last else gamma.reshape((-1,) + (1,) * (y.dim() - 2))
    return y * view.to(y.dtype)


def scale_weight(w: Tensor, gamma: Tensor, transposed: bool = False) -> Tensor:
    """``diag(gamma) W``: the merged projection weight."""
    return w * _out_view(gamma, w, transposed).to(w.dtype)


def unscale_weight(w: Tensor, gamma: Tensor, transposed: bool = False) -> Tensor:
    """``diag(1 / gamma) W`` (rows of a zero gamma come out non-finite; the caller restores them)."""
    return w / _out_view(gamma, w, transposed).to(w.dtype)


def merged_bias(b0: Tensor, gamma: Tensor, delta_b: Tensor | None = None) -> Tensor:
    """``gamma * (b0 + delta_b)``: the trained bias and gamma in one bias."""
    b = b0 if delta_b is None else b0 + delta_b.to(b0.dtype)
    return b * gamma.to(b.dtype)


def unmerged_bias(b: Tensor, gamma: Tensor, delta_b: Tensor | None = None) -> Tensor:
    """Inverse of ``merged_bias`` where gamma is nonzero."""
    out = b / gamma.to(b.dtype)
    return out if delta_b is None else out - delta_b.to(b.dtype)


def lost_channels(original: Tensor, gamma: Tensor, transposed: bool = False) -> tuple[Tensor, Tensor] | None:
    """The output channels whose pre-merge values ``unscale_weight`` cannot give back (gamma zero, or so small
    that the division overflows): their indices and values in ``original``; None when every channel comes back."""
    back = unscale_weight(scale_weight(original, gamma, transposed), gamma, transposed)
    bad = ~torch.isfinite(back)
    if bad.dim() > 1:
        bad = bad.any(0) if transposed else bad.flatten(1).any(1)
    idx = bad.nonzero().squeeze(1)
    if not idx.numel():
        return None
    return idx, original.index_select(1 if transposed else 0, idx).clone()


def restore_channels(value: Tensor, lost: tuple[Tensor, Tensor] | None, transposed: bool = False) -> Tensor:
    """``value`` with the channels ``lost_channels`` recorded put back (in place)."""
    if lost is None:
        return value
    idx, rows = lost
    return value.index_copy_(1 if transposed else 0, idx, rows.to(value.dtype))
