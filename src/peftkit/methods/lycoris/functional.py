"""LoHa / LoKr weight math as pure functions on tensors (no modules, no state): testable alone.

Layouts follow Hugging Face PEFT (and LyCORIS), so checkpoints are interchangeable:

- LoHa, matrix form: ``w1_a`` (d_out, r), ``w1_b`` (r, d_in); the same for ``w2``. A conv kernel is
  handled as the (c_out, c_in * prod(kernel)) matrix.
- LoHa, CP form (effective conv): ``t`` (r, r, *k), ``w_a`` (r, c_out), ``w_b`` (r, c_in); a Conv1d kernel
  is stored (k, 1), as PEFT.
- LoKr: ``W1`` (a, c) and ``W2`` (b, d [, *kernel]) with d_out = a b, d_in = c d.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension`` into ``(m, n)``, ``m <= n``, ``m n = dimension`` (LyCORIS' rule, as PEFT).

    With ``factor > 0`` dividing ``dimension`` the split is ``(factor, dimension // factor)``; otherwise the
    divisor pair with the smallest sum whose smaller member does not exceed ``factor`` (-1: no bound),
    i.e. the pair nearest the square root.
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    if m > n:
        m, n = n, m
    return m, n


def hadamard_delta(
    w1_a: Tensor, w1_b: Tensor, w2_a: Tensor, w2_b: Tensor, scale: float, base: Tensor | None = None
) -> Tensor:
    """LoHa: ``((w1_a @ w1_b) * (w2_a @ w2_b)) * scale``, a (d_out, d_in) matrix, plus ``base`` if given.

    For backward only the four factors are kept (the two rank-r products are recomputed), not two
    (d_out, d_in) matrices, as PEFT's ``HadaWeight`` does. Forward allocates two (d_out, d_in) buffers
    (the products; the rest is in place), backward two more; ``base`` (e.g. the frozen weight, for one
    GEMM with ``W0 + dW``) is added into the result, and its gradient is passed through."""
    return _HadamardDelta.apply(w1_a, w1_b, w2_a, w2_b, scale, base)


class _HadamardDelta(torch.autograd.Function):
    """``D = s (A1 B1) * (A2 B2)``; with G = dL/dD: ``dA1 = s (G * P2) B1^T``, ``dB1 = s A1^T (G * P2)``, and
    the same for the second pair with P1 (P_i = A_i B_i)."""

    @staticmethod
    def forward(ctx, w1_a: Tensor, w1_b: Tensor, w2_a: Tensor, w2_b: Tensor, scale: float,  # type: ignore[override]
                base: Tensor | None) -> Tensor:
        ctx.save_for_backward(w1_a, w1_b, w2_a, w2_b)
        ctx.scale = scale
        out = (w1_a @ w1_b).mul_(w2_a @ w2_b).mul_(scale)
        return out if base is None else out.add_(base)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        w1_a, w1_b, w2_a, w2_b = ctx.saved_tensors
        s = ctx.scale
        n1a, n1b, n2a, n2b = ctx.needs_input_grad[:4]
        grads: list[Tensor | None] = [None] * 4
        if n1a or n1b:
            g1 = (w2_a @ w2_b).mul_(g)
            grads[0] = (g1 @ w1_b.t()).mul_(s) if n1a else None
            grads[1] = (w1_a.t() @ g1).mul_(s) if n1b else None
        if n2a or n2b:
            g2 = (w1_a @ w1_b).mul_(g)
            grads[2] = (g2 @ w2_b.t()).mul_(s) if n2a else None
            grads[3] = (w2_a.t() @ g2).mul_(s) if n2b else None
        return (*grads, None, g if ctx.needs_input_grad[5] else None)


def cp_rebuild(t: Tensor, w_a: Tensor, w_b: Tensor) -> Tensor:
    """A kernel from its CP / Tucker factors: ``t`` (r, r, *k), ``w_a`` (r, c_out), ``w_b`` (r, c_in) ->
    (c_out, c_in, *k)."""
    return torch.einsum("i j ..., i p, j q -> p q ...", t, w_a, w_b)


def hadamard_delta_cp(
    t1: Tensor, w1_a: Tensor, w1_b: Tensor, t2: Tensor, w2_a: Tensor, w2_b: Tensor, scale: float
) -> Tensor:
    """LoHa with CP-factored kernels (``use_effective_conv2d``): (c_out, c_in, *k)."""
    return cp_rebuild(t1, w1_a, w1_b) * cp_rebuild(t2, w2_a, w2_b) * scale


def kron_delta(w1: Tensor, w2: Tensor, scale: float) -> Tensor:
    """LoKr: ``kron(W1, W2) * scale``; a 4-D / 5-D ``W2`` (Conv2d / Conv3d kernel) gets ``W1`` broadcast
    over the kernel. A 3-D ``W2`` (a full Conv1d ``lokr_w2``) is left to ``torch.kron``'s own broadcasting
    (``W1`` taken as (1, a, c)), which is not the channel-wise Kronecker product but is what PEFT computes:
    kept, so that PEFT's Conv1d files give the same outputs."""
    if w2.dim() >= 4:
        w1 = w1.reshape(*w1.shape, *(1,) * (w2.dim() - 2))
    return torch.kron(w1, w2.contiguous()) * scale


def kron_matvec(x: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
    """``x @ kron(W1, W2)^T`` without forming the Kronecker product: ``W1 X W2^T`` per row of ``x``.

    ``x`` is (..., c d) with ``W1`` (a, c) and ``W2`` (b, d); the result is (..., a b). Costs
    n (a c d + a b d) instead of n (a b c d) multiply-adds. For backward only ``x`` and the factors are kept
    (the intermediate ``X W2^T`` is recomputed), so training holds no more per-token memory than a product
    with the formed ``d_out x d_in`` delta would.
    """
    lead = x.shape[:-1]
    y = _KronMatvec.apply(x.reshape(-1, x.shape[-1]), w1, w2)
    return y.reshape(*lead, y.shape[-1])


def _kron_forward(x: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
    # plain 2-D GEMMs only: batched matmul picks its kernel by requires_grad, which would make the
    # result depend (in the last bit) on whether the adapter is trainable
    a, c = w1.shape
    b, d = w2.shape
    z = F.linear(x.reshape(-1, d), w2)  # (n c, b)
    z = z.view(-1, c, b).transpose(1, 2).reshape(-1, c)  # (n b, c)
    y = F.linear(z, w1).view(-1, b, a).transpose(1, 2)  # (n, a, b)
    return y.reshape(-1, a * b)


class _KronMatvec(torch.autograd.Function):
    """``Y[n] = W1 X[n] W2^T`` with X[n] (c, d) and Y[n] (a, b); gradients, with G[n] = dL/dY[n] (a, b):
    ``dX[n] = W1^T G[n] W2``, ``dW1 = sum_n G[n] W2 X[n]^T``, ``dW2 = sum_n (W1^T G[n])^T X[n]``."""

    @staticmethod
    def forward(ctx, x: Tensor, w1: Tensor, w2: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, w1, w2)
        return _kron_forward(x, w1, w2)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # type: ignore[override]
        x, w1, w2 = ctx.saved_tensors
        a, c = w1.shape
        b, d = w2.shape
        n = x.shape[0]
        need_x, need_w1, need_w2 = ctx.needs_input_grad
        g = g.reshape(n, a, b)
        grad_x = grad_w1 = grad_w2 = None
        if need_x or need_w1:
            t = F.linear(g.reshape(n * a, b), w2.t()).view(n, a, d)  # G[n] W2
            if need_x:  # W1^T (G[n] W2), as (n, d, a) @ W1 -> (n, d, c) -> (n, c, d)
                gx = F.linear(t.transpose(1, 2).reshape(n * d, a), w1.t()).view(n, d, c)
                grad_x = gx.transpose(1, 2).reshape(n, c * d)
            if need_w1:  # sum_n (G[n] W2) X[n]^T
                grad_w1 = t.permute(1, 0, 2).reshape(a, n * d) @ x.view(n, c, d).transpose(1, 2).reshape(n * d, c)
        if need_w2:  # sum_n (W1^T G[n])^T X[n]: (n, b, c) stacked over n, times X
            h = F.linear(g.transpose(1, 2).reshape(n * b, a), w1.t()).view(n, b, c)
            grad_w2 = h.permute(1, 0, 2).reshape(b, n * c) @ x.reshape(n * c, d)
        return grad_x, grad_w1, grad_w2


def lokr_uses_full(r: int, dims: tuple[int, int]) -> bool:
    """Whether a Kronecker factor of shape ``dims`` is kept whole (PEFT: unless r < max(dims) / 2)."""
    return not (r < max(dims) / 2)


def lokr_shapes(
    d_out: int,
    d_in: int,
    kernel: tuple[int, ...],
    r: int,
    decompose_both: bool = False,
    decompose_factor: int = -1,
    use_effective_conv2d: bool = False,
) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape for one LoKr adapter (PEFT's rules). ``kernel`` is () for a linear layer.

    ``d_out = a b`` and ``d_in = c d`` are split by :func:`factorization`; ``W1`` is (a, c) or, with
    ``decompose_both`` and a small r, ``W1_a W1_b``; ``W2`` is (b, d, *kernel) or, for a small r,
    ``W2_a W2_b`` (CP-factored with ``t2`` for an effective conv).
    """
    c, d = factorization(d_in, decompose_factor)
    a, b = factorization(d_out, decompose_factor)
    shapes: dict[str, tuple[int, ...]] = {}
    if not (decompose_both and r < max(a, c) / 2):
        shapes["lokr_w1"] = (a, c)
    else:
        shapes["lokr_w1_a"], shapes["lokr_w1_b"] = (a, r), (r, c)
    effective = use_effective_conv2d and bool(kernel) and math.prod(kernel) != 1
    if lokr_uses_full(r, (b, d)):
        shapes["lokr_w2"] = (b, d, *kernel)
    elif effective:
        k = tuple(kernel) if len(kernel) >= 2 else (kernel[0], 1)
        shapes["lokr_t2"], shapes["lokr_w2_a"], shapes["lokr_w2_b"] = (r, r, *k), (r, b), (r, d)
    else:
        shapes["lokr_w2_a"], shapes["lokr_w2_b"] = (b, r), (r, d * math.prod(kernel))
    return shapes


def loha_shapes(
    d_out: int, d_in: int, kernel: tuple[int, ...], r: int, use_effective_conv2d: bool = False
) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape for one LoHa adapter (PEFT's rules). ``kernel`` is () for a linear layer."""
    if use_effective_conv2d and kernel and math.prod(kernel) != 1:
        k = tuple(kernel) if len(kernel) >= 2 else (kernel[0], 1)
        return {
            "hada_w1_a": (r, d_out), "hada_w1_b": (r, d_in), "hada_t1": (r, r, *k),
            "hada_w2_a": (r, d_out), "hada_w2_b": (r, d_in), "hada_t2": (r, r, *k),
        }
    cols = d_in * math.prod(kernel)
    return {"hada_w1_a": (d_out, r), "hada_w1_b": (r, cols), "hada_w2_a": (d_out, r), "hada_w2_b": (r, cols)}


def row_dropout_mask(rows: int, p: float, rescale: bool, like: Tensor) -> Tensor:
    """A keep-mask over output rows (each dropped with probability ``p``), optionally scaled to mean 1."""
    keep = (torch.rand(rows, device=like.device) > p).to(like.dtype)
    return keep / keep.mean() if rescale else keep
