"""DyLoRA's math as pure functions.

Layouts: ``A`` (r, d_in), ``B`` (d_out, r). At rank ``b`` (the paper's eq. 3-4) the layer uses the first b rows of
``A`` and the first b columns of ``B`` and the scale ``alpha / b``:

    h = W0 x + (alpha / b) B[:, :b] A[:b] x,        b ~ U{r_min, ..., r} per training step

The "frozen" update trains only the unique part of rank b, row b of A and column b of B; the lower rows / columns
enter the product detached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..lora.functional import lora_delta


def sample_rank(r_min: int, r: int, generator: torch.Generator | None = None) -> int:
    """A rank drawn uniformly from {r_min, ..., r} (torch's generator: ``torch.manual_seed`` reproduces it)."""
    return int(torch.randint(r_min, r + 1, (), generator=generator))


def truncate(A: Tensor, B: Tensor, b: int, frozen: bool = False) -> tuple[Tensor, Tensor]:
    """``(A[:b], B[:, :b])``; ``frozen``: rows / columns below b detached (only the b-th trains)."""
    A_b, B_b = A[:b], B[:, :b]
    if frozen and b > 1:
        A_b = torch.cat([A[: b - 1].detach(), A[b - 1 : b]], 0)
        B_b = torch.cat([B[:, : b - 1].detach(), B[:, b - 1 : b]], 1)
    return A_b, B_b


def scaling(alpha: float, b: int) -> float:
    """The scale of rank b, ``alpha / b``."""
    return alpha / b


def delta(A: Tensor, B: Tensor, b: int, alpha: float) -> Tensor:
    """``(alpha / b) B[:, :b] A[:b]`` (d_out, d_in): the rank-b LoRA of the truncated factors."""
    A_b, B_b = truncate(A, B, b)
    return lora_delta(A_b, B_b, scaling(alpha, b))


def output(x: Tensor, A: Tensor, B: Tensor, b: int, alpha: float, frozen: bool = False) -> Tensor:
    """``(alpha / b) B[:, :b] A[:b] x`` on the last axis of ``x``."""
    A_b, B_b = truncate(A, B, b, frozen)
    return F.linear(F.linear(x, A_b), B_b) * scaling(alpha, b)


def accumulate(out: Tensor, x: Tensor, A: Tensor, B: Tensor, b: int, alpha: float, frozen: bool = False) -> Tensor:
    """``out + output(x, ...)`` (``out``: the base output, of the factors' dtype) as one GEMM accumulating into a
    fresh tensor (no (n, d_out) temporaries beside the result)."""
    A_b, B_b = truncate(A, B, b, frozen)
    n = out.shape[-1]
    h = F.linear(x.reshape(-1, x.shape[-1]), A_b)
    return torch.addmm(out.reshape(-1, n), h, B_b.t(), alpha=scaling(alpha, b)).view(out.shape)
