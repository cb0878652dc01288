"""MoLE's math as pure functions: the gate, the gated sum of the experts, the merged delta, the balance loss.

Shapes: a layer's input ``x (..., d_in)``; N experts, expert i: ``A_i (r_i, d_in)``, ``B_i (d_out, r_i)``, scale
``s_i``; the gate ``W_g (N, d_in)``, ``b_g (N,)`` (input-dependent) or logits ``(N,)``; gate values ``(..., N)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def gate(x: Tensor | None, weight: Tensor | None, bias: Tensor | None, logits: Tensor | None,
         temperature: float) -> Tensor:
    """``softmax(eps / tau)`` over the experts: ``eps = W_g x + b_g`` (per token), or the fixed-size ``logits``."""
    eps = F.linear(x, weight, bias) if weight is not None else logits
    return torch.softmax(eps / temperature, dim=-1)


def mixture(x: Tensor, As: list[Tensor], Bs: list[Tensor], scales: list[float], weights: Tensor) -> Tensor:
    """``sum_i w_i s_i B_i A_i x`` with ``w_i = weights[..., i]`` (per token, or one (N,) vector for all).

    The weight commutes with ``A_i``, so it is applied on the rank side: one GEMM with the concatenated ``A``
    (``sum r_i`` rows), a per-(token, rank) multiply, one GEMM with the concatenated ``B``."""
    A = torch.cat(As, 0) if len(As) > 1 else As[0]  # (sum r, d_in)
    B = torch.cat(Bs, 1) if len(Bs) > 1 else Bs[0]  # (d_out, sum r)
    ranks = [a.shape[0] for a in As]
    which = torch.repeat_interleave(torch.arange(len(ranks), device=A.device), torch.tensor(ranks, device=A.device))
    col = torch.tensor([s for s, r in zip(scales, ranks) for _ in range(r)], dtype=A.dtype, device=A.device)
    h = F.linear(x, A)  # (..., sum r)
    h = h * (weights.to(h.dtype).index_select(-1, which) * col)
    return F.linear(h, B)  # (..., d_out)


def mixture_reference(x: Tensor, As: list[Tensor], Bs: list[Tensor], scales: list[float], weights: Tensor) -> Tensor:
    """The formula term by term, ``sum_i w_i(x) (B_i (A_i x)) s_i`` (the check of ``mixture``)."""
    out = 0
    for i, (a, b, s) in enumerate(zip(As, Bs, scales)):
        out = out + weights[..., i : i + 1] * ((x @ a.t()) @ b.t()) * s
    return out


def delta_weight(As: list[Tensor], Bs: list[Tensor], scales: list[float], weights: Tensor,
                 transposed: bool) -> Tensor:
    """``sum_i w_i s_i B_i A_i`` (d_out, d_in), in the base weight's layout (``transposed``: GPT-2's Conv1D)."""
    delta = sum(float(w) * s * (b @ a) for w, a, b, s in zip(weights.tolist(), As, Bs, scales))
    return delta.t() if transposed else delta


def balance_loss(layer_means: list[Tensor]) -> Tensor:
    """The gating-balance loss ``L_balance = -log prod_i q_i = -sum_i log q_i``, where ``q_i`` is expert i's gate
    value averaged over the M gated layers (``layer_means``: each layer's gate values averaged over its tokens,
    (N,) each). Smallest, ``N log N``, when every ``q_i = 1 / N``."""
    q = torch.stack(layer_means).mean(0)
    return -torch.log(q).sum()


def init_expert(A: Tensor, B: Tensor, lora_init: bool) -> None:
    """A fresh expert, as LoRA: ``A`` Kaiming-uniform (a = sqrt 5), ``B = 0``; ``lora_init=False``: ``B`` drawn as A."""
    with torch.no_grad():
        torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        if lora_init:
            B.zero_()
        else:
            torch.nn.init.kaiming_uniform_(B, a=math.sqrt(5))
