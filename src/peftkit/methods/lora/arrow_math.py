"""Arrow's tensor math as pure functions (the router: ``methods/lora/arrow.py``).

- ``top_right_singular_vector``: the prototype of one expert, the dominant right singular vector of ``B A``
  (d_out, d_in) by power iteration on ``v -> A^T (B^T B) (A v)``, never forming ``B A``; float32, peft's start
  vector and iteration count, so the prototypes equal peft's.
- ``subtract_general_knowledge``: GenKnowSub's ``A_e -= mean_g A_g``, ``B_e -= mean_g B_g`` on the factors (as peft).
- ``arrow_delta``: the routed update of a batch of tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

POWER_ITERATIONS = 15  # peft's ``top_right_singular_vec_from_BA(iters=15, eps=1e-8)``
EPS = 1e-8


@torch.no_grad()
def top_right_singular_vector(A: Tensor, B: Tensor, seed: int | None = None, iters: int = POWER_ITERATIONS,
                              eps: float = EPS) -> Tensor:
    """Unit vector (d_in,), float32: the top right singular vector of ``B A`` (A (r, d_in), B (d_out, r)), up to
    sign. The start vector is ``randn(d_in)`` from a generator seeded with ``seed`` on A's device type, or from the
    global generator when ``seed`` is None (peft's draws)."""
    A32, B32 = A.to(torch.float32), B.to(torch.float32)
    C = B32.T @ B32  # (r, r)
    gen = None
    if seed is not None:
        gen = torch.Generator(device=A32.device.type)
        gen.manual_seed(int(seed))
    v = torch.randn(A32.size(1), dtype=A32.dtype, device=A32.device, generator=gen)
    v = v / (v.norm() + eps)
    for _ in range(iters):
        w = A32.T @ (C @ (A32 @ v))  # (B A)^T (B A) v
        v = w / (w.norm() + eps)
    return v


@torch.no_grad()
def subtract_general_knowledge(experts: Sequence[tuple[Tensor, Tensor]],
                               general: Sequence[tuple[Tensor, Tensor]]) -> None:
    """In place: every expert's ``(A, B)`` minus the mean ``A`` and mean ``B`` of the ``general`` adapters."""
    avg_A = torch.stack([a for a, _ in general]).mean(0)
    avg_B = torch.stack([b for _, b in general]).mean(0)
    for A, B in experts:
        A.sub_(avg_A)
        B.sub_(avg_B)


def routing_weights(tok: Tensor, prototypes: Tensor, top_k: int, temperature: float) -> Tensor:
    """(t, E): softmax over each token's ``top_k`` scores ``|x . p_e|`` divided by ``temperature``; 0 elsewhere.
    The score is sign-agnostic (a singular vector's sign is arbitrary)."""
    sim = (tok @ prototypes.T).abs()  # (t, E)
    top_v, idx = torch.topk(sim, top_k, dim=1)
    full = torch.full_like(sim, float("-inf")).scatter(1, idx, top_v)
    return torch.softmax(full / temperature, dim=1)


def arrow_delta(x: Tensor, prototypes: Tensor, As: Sequence[Tensor], Bs: Sequence[Tensor], scales: Sequence[float],
                top_k: int, temperature: float) -> Tensor:
    """``sum_e w_e(x) s_e B_e A_e x`` for each token of ``x`` (..., d_in) -> (..., d_out), with ``w`` from
    ``routing_weights``: two GEMMs over the experts' concatenated factors (ranks may differ)."""
    tok = x.reshape(-1, x.shape[-1])  # (t, d_in)
    coeff = routing_weights(tok, prototypes, top_k, temperature)  # (t, E)
    coeff = coeff * torch.tensor(list(scales), device=tok.device, dtype=tok.dtype)
    ranks = torch.tensor([a.shape[0] for a in As], device=tok.device)
    h = tok @ torch.cat(list(As), dim=0).T  # (t, sum r): every expert's A x
    h = h * torch.repeat_interleave(coeff, ranks, dim=1)  # each expert's block weighted by w_e s_e
    delta = h @ torch.cat(list(Bs), dim=1).T  # (t, d_out)
    return delta.reshape(*x.shape[:-1], delta.shape[-1])
