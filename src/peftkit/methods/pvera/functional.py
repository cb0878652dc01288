"""PVeRA's weight math as pure functions (shapes in the docstrings; ``r``: the rank, ``A`` has ``2 r`` rows)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..vera import vera_delta, vera_projections


def pvera_projections(r: int, d_in: int, d_out: int, seed: int) -> tuple[Tensor, Tensor]:
    """The shared frozen projections ``A`` (2r, d_in) and ``B`` (d_out, r): Kaiming uniform, ``A`` then ``B``
    from one CPU generator seeded with ``seed`` (PEFT's ``_init_pvera_A_pvera_B``; VeRA's draw with a taller A)."""
    return vera_projections(r, d_in, d_out, seed, a_rows=2 * r)


def sample_noise(like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped as ``like``: from ``generator`` (CPU, then moved to ``like``'s device, as
    PEFT does: a generator cannot move), or from the global generator when None."""
    if generator is None:
        return torch.randn_like(like)
    return torch.randn(like.shape, dtype=like.dtype, generator=generator).to(like.device)


def reparametrize(mu: Tensor, logvar: Tensor, eps: Tensor) -> Tensor:
    """``z = mu + eps * exp(logvar / 2)``: a draw from N(mu, exp(logvar)), differentiable in mu and logvar."""
    return mu + eps * torch.exp(0.5 * logvar)


def pvera_latent_stats(x: Tensor, a: Tensor, lambda_d: Tensor) -> tuple[Tensor, Tensor]:
    """``(mu, logvar)``, each (..., r): the two halves of ``diag(d) A x`` (x: (..., d_in), A: (2r, d_in), d: (2r,))."""
    return (lambda_d * F.linear(x, a)).chunk(2, dim=-1)


def pvera_mean_latent(x: Tensor, a: Tensor, lambda_d: Tensor) -> Tensor:
    """``mu`` (..., r) alone: the first half of ``diag(d) A x`` from the first ``r`` rows of A (half the work)."""
    r = lambda_d.shape[0] // 2
    return lambda_d[:r] * F.linear(x, a[:r])


def pvera_output(z: Tensor, b: Tensor, lambda_b: Tensor) -> Tensor:
    """``diag(b) B z`` (..., d_out) for a latent z (..., r), B (d_out, r), b (d_out,)."""
    return lambda_b * F.linear(z, b)


def pvera_mean_delta(lambda_b: Tensor, lambda_d: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """The weight of the mean path, ``diag(b) B diag(d[:r]) A[:r]`` (d_out, d_in): what a merge folds in (the
    log-variance half only acts through sampling)."""
    r = lambda_d.shape[0] // 2
    return vera_delta(lambda_b, lambda_d[:r], a[:r], b)

