"""The autograd function of the OFT / BOFT hot path on Linear (and GPT-2 Conv1D) layers.

``y = (x R) W^T + b`` rotates whichever side has fewer rows: the (d_out x n) weight (``x (W R^T)^T``,
``d_out n b`` multiply-adds per factor) or the (tokens x n) input (``tokens n b``, as PEFT does always);
e.g. with 512 tokens the weight of a 384 -> 384 projection, the input of a 384 -> 1536 one. Either way
the forward pass keeps no rotated copy for backward. Backward needs ``g W`` (the input gradient of the
frozen layer, computed anyway) and then only block-sized products per factor: ``dR_k = u_k^T (g W)_k``
and the input gradient ``(g W) R^T``, written in place without transposing copies. Intermediate inputs
of a multi-factor butterfly are recomputed, not stored.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import functional as OF


class RotatedLinear(torch.autograd.Function):
    """``out = (x R) W^T + bias`` for 2-D ``x`` (N, n), ``W`` (d_out, n) (any strides), ``R`` butterfly.

    ``blocks`` (m, D, b, b) and ``perms`` as in :func:`functional.butterfly_apply`. ``rotate_input``: rotate
    ``x`` rather than ``W`` (default: when N < d_out).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, bias: Tensor | None, blocks: Tensor, perms: list,
                rotate_input: bool | None = None) -> Tensor:
        if rotate_input is None:
            rotate_input = x.shape[0] < w.shape[0]
        if rotate_input:  # fewer tokens than output features: rotate the input
            out = torch.nn.functional.linear(OF.butterfly_apply(x, blocks, perms), w, bias)
        else:
            w_rot = OF.butterfly_apply(w, blocks, perms, transpose=True)  # W R^T, (d_out, n)
            out = torch.addmm(bias, x, w_rot.t()) if bias is not None else x @ w_rot.t()
        ctx.save_for_backward(x, w, blocks)
        ctx.perms, ctx.has_bias = perms, bias is not None
        return out

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x, w, blocks = ctx.saved_tensors
        perms = ctx.perms
        need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
        m, d, b, _ = blocks.shape
        order = list(OF.factor_order(m))
        # inputs of each factor, in the order they act: u_0 = x, u_{j+1} = u_j A_{order[j]}
        inputs = [x]
        for i in order[:-1]:
            inputs.append(OF.factor_apply(inputs[-1], blocks[i], perms[i]))
        grad_w = None
        if need_w:
            grad_w = g.t() @ OF.factor_apply(inputs[-1], blocks[order[-1]], perms[order[-1]])
        grad_r = torch.zeros_like(blocks) if need_r else None
        grad_u = g @ w  # gradient w.r.t. x R
        for j in range(m - 1, -1, -1):
            i, perm = order[j], perms[order[j]]
            a, gv = inputs[j], grad_u
            if perm is not None:  # the factor reads u[p^-1] and writes v[p]
                a, gv = a.index_select(1, perm[1]), gv.index_select(1, perm[1])
            if need_r:
                OF.block_outer(a, gv, d, b, out=grad_r[i])
            if j == 0 and not need_x:
                grad_u = None
                break
            # the last product goes straight into a fresh gradient (no transposing copy)
            out = torch.empty_like(x) if j == 0 and perm is None else None
            grad_u = OF.block_apply(gv, blocks[i], transpose=True, out=out)
            if perm is not None:
                grad_u = grad_u.index_select(1, perm[0])
        grad_b = g.sum(0) if ctx.has_bias and need_b else None
        return grad_u, grad_w, grad_b, grad_r, None, None
