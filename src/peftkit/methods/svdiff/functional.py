"""SVDiff's math as pure functions on tensors (no modules, no state), and the builder ``ReparamOp`` runs it with.

Layout: the weight as a matrix ``M`` (d_out, d_in'): Linear's own (d_out, d_in); a convolution's kernel
(d_out, c_in / groups, *k) flattened to (d_out, c_in / groups * prod(k)); GPT-2 Conv1D's (d_in, d_out) transposed.
``M = U diag(sigma) V^T`` is its thin SVD: ``U`` (d_out, r), ``sigma`` (r,), ``Vh = V^T`` (r, d_in'),
``r = min(d_out, d_in')``; the shift ``delta`` is (r,).
"""

from __future__ import annotations

import torch
from torch import Tensor


def as_matrix(w: Tensor, transposed: bool = False) -> Tensor:
    """The weight as the (d_out, d_in') matrix whose singular values shift."""
    return w.t() if transposed else w.reshape(w.shape[0], -1)


def from_matrix(m: Tensor, shape: tuple[int, ...], transposed: bool = False) -> Tensor:
    """Inverse of ``as_matrix``: a (d_out, d_in') matrix in the weight's own layout."""
    return m.t() if transposed else m.reshape(shape)


def factorize(m: Tensor, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD ``(U, sigma, Vh)`` of ``m`` computed in ``dtype`` (at least float32)."""
    u, s, vh = torch.linalg.svd(m.detach().to(dtype), full_matrices=False)
    return u.contiguous(), s.contiguous(), vh.contiguous()


def shift_gain(sigma: Tensor, delta: Tensor) -> Tensor:
    """``ReLU(sigma + delta) - sigma``: the change of each singular value (exactly 0 where ``delta`` is 0, as
    ``sigma >= 0``)."""
    return torch.relu(sigma + delta) - sigma


def spectral_delta(u: Tensor, sigma: Tensor, vh: Tensor, delta: Tensor) -> Tensor:
    """``U diag(ReLU(sigma + delta) - sigma) V^T`` (d_out, d_in'): added to ``W`` it gives
    ``U diag(ReLU(sigma + delta)) V^T`` plus the base's SVD reconstruction residual, so ``delta = 0`` is the base
    exactly."""
    return (u * shift_gain(sigma, delta.to(sigma.dtype))) @ vh


def shifted_weight(u: Tensor, sigma: Tensor, vh: Tensor, delta: Tensor) -> Tensor:
    """The paper's ``U diag(ReLU(sigma + delta)) V^T`` (for reference and tests)."""
    return (u * torch.relu(sigma + delta.to(sigma.dtype))) @ vh


def delta_grad(u: Tensor, sigma: Tensor, vh: Tensor, delta: Tensor, grad_m: Tensor) -> Tensor:
    """Gradient of the loss in ``delta`` from its gradient ``grad_m`` in the (d_out, d_in') delta matrix:
    ``diag(U^T G V) * 1[sigma + delta > 0]`` (ReLU's derivative, 0 at 0 as torch's)."""
    g = ((u.t() @ grad_m.to(u.dtype)) * vh).sum(1)
    return g * (sigma + delta.to(sigma.dtype) > 0).to(g.dtype)


class SpectralBuilder:
    """The delta of one weight for ``selective.functional.ReparamOp`` (which forms ``W0 + D`` per call, outside
    autograd, and keeps neither for the backward pass): ``effective`` gives ``W0 + D(delta)`` (or ``D``),
    ``vjp`` maps the weight gradient onto ``delta``."""

    def __init__(self, u: Tensor, sigma: Tensor, vh: Tensor, shape: tuple[int, ...], transposed: bool) -> None:
        self.u, self.sigma, self.vh, self.shape, self.transposed = u, sigma, vh, shape, transposed

    def effective(self, theta: tuple[Tensor, ...], w0: Tensor | None) -> Tensor:
        d = from_matrix(spectral_delta(self.u, self.sigma, self.vh, theta[0]), self.shape, self.transposed)
        return d if w0 is None else w0 + d.to(w0.dtype)

    def vjp(self, theta: tuple[Tensor, ...], grad: Tensor) -> tuple[Tensor, ...]:
        g = delta_grad(self.u, self.sigma, self.vh, theta[0], as_matrix(grad, self.transposed))
        return (g.to(theta[0].dtype),)
