"""OSF's weight math as pure functions (the same operations, in the same order, as Hugging Face PEFT).

Shapes, for a weight ``W`` (d_out, d_in) of SVD ``U diag(S) V^T`` split at the preserved rank k
(r = min(d_out, d_in) - k trainable directions): ``u`` (d_out, r), ``s`` (r,), ``v`` (r, d_in) the trained low
components, ``u0`` / ``s0`` / ``v0`` their frozen values at creation, ``u_high`` (d_out, k) / ``v_high`` (k, d_in)
the frozen top-k subspace.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def resolve_rank(value: int | float | None, min_dim: int) -> int:
    """PEFT's effective rank: None -> min_dim // 2; a float in (0, 1] -> int(min_dim * value); else int(value);
    clamped to [0, min_dim]."""
    if value is None:
        return max(min_dim // 2, 0)
    r = int(min_dim * value) if isinstance(value, float) and 0 < value <= 1 else int(value)
    return max(min(min_dim, r), 0)


def split_svd(weight: Tensor, k: int, dtype: torch.dtype) -> dict[str, Tensor]:
    """The thin SVD of ``weight`` (d_out, d_in), computed in float32, split after the top ``k`` directions:
    ``U_high`` (d_out, k), ``V_high`` (k, d_in) and the low ``U_low`` (d_out, r), ``S_low`` (r,), ``V_low``
    (r, d_in), each contiguous in ``dtype``."""
    u, s, vt = torch.linalg.svd(weight.detach().to(torch.float32), full_matrices=False)
    k = min(k, s.shape[0])
    parts = {"U_high": u[:, :k], "V_high": vt[:k, :], "U_low": u[:, k:], "S_low": s[k:], "V_low": vt[k:, :]}
    return {name: t.contiguous().to(dtype) for name, t in parts.items()}


def osf_delta(u: Tensor, s: Tensor, v: Tensor, u0: Tensor, s0: Tensor, v0: Tensor) -> Tensor:
    """``dW = U diag(S) V - U0 diag(S0) V0`` (d_out, d_in): the weight becomes ``W_high + U diag(S) V``."""
    return torch.mm(u * s.unsqueeze(0), v) - torch.mm(u0 * s0.unsqueeze(0), v0)


def osf_apply(x: Tensor, u: Tensor, s: Tensor, v: Tensor, u0: Tensor, s0: Tensor, v0: Tensor) -> Tensor:
    """``x dW^T`` without forming ``dW``: PEFT's rank-2r product ``(x [V; V0]^T) [U S, -U0 S0]^T``."""
    a = torch.cat([u * s.unsqueeze(0), -(u0 * s0.unsqueeze(0))], dim=1)
    b = torch.cat([v, v0], dim=0)
    return F.linear(F.linear(x, b), a)


def project_left(grad: Tensor, basis: Tensor, keep: bool) -> Tensor:
    """A gradient of ``U`` (d_out, r) with no component in the frozen column space: ``basis basis^T grad`` when
    ``basis`` spans the complement (``u0``, square ``U``), else ``grad - basis (basis^T grad)`` (``basis`` =
    ``u_high``)."""
    if keep:
        return basis @ (basis.transpose(0, 1) @ grad)
    return grad - basis @ (basis.transpose(0, 1) @ grad)


def project_right(grad: Tensor, basis: Tensor, keep: bool) -> Tensor:
    """The same for ``V`` (r, d_in) on the row side: ``(grad v0^T) v0``, or ``grad - (grad v_high^T) v_high``."""
    if keep:
        return (grad @ basis.transpose(0, 1)) @ basis
    return grad - (grad @ basis.transpose(0, 1)) @ basis


class ProjectGrad(torch.autograd.Function):
    """Identity forward; backward projects the gradient out of the frozen subspace (PEFT's gradient hook on the
    parameter, here inside autograd, so any optimizer and any training loop apply it)."""

    @staticmethod
    def forward(ctx, p: Tensor, basis: Tensor, right: bool, keep: bool) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(basis)
        ctx.right, ctx.keep = right, keep
        return p.view_as(p)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (basis,) = ctx.saved_tensors
        fn = project_right if ctx.right else project_left
        return fn(grad, basis.to(grad.dtype), ctx.keep), None, None, None
