"""Poly / MHR's math as pure functions (the same operations as Hugging Face PEFT's ``PolyRouter`` and
``poly.Linear``, with the ``1 / r`` folded into the mixed ``B`` and the product accumulated into the output)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions.relaxed_bernoulli import RelaxedBernoulli

EPS = 1e-12  # PEFT's floor on the normaliser of the routing weights


def mixing_weights(logits: Tensor, n_splits: int, n_skills: int, training: bool) -> Tensor:
    """Routing weights (rows, n_splits, n_skills) from the rows' module logits (rows, n_splits * n_skills):
    training draws a relaxed Bernoulli sample (temperature 1, reparameterised), otherwise the sigmoid; each
    split's weights are normalised to sum to 1."""
    logits = logits.view(-1, n_splits, n_skills)
    if training:
        z = RelaxedBernoulli(temperature=1.0, logits=logits).rsample()
    else:
        z = torch.sigmoid(logits)
    return z / (z.sum(dim=-1, keepdim=True) + EPS)


def mixed_factors(w: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's LoRA factors, the skills combined with its weights ``w`` (rows, q, s):
    ``A_row`` (rows, d_in, r) from ``a`` (q, s, d_in / q, r) and ``B_row`` (rows, r, d_out) from ``b``
    (q, s, r, d_out / q); split k of the input features meets split k of ``A``, split k of the output features
    comes from split k of ``B``."""
    rows, r = w.shape[0], a.shape[-1]
    a_rows = torch.einsum("bqs,qsdr->bqdr", w, a).reshape(rows, -1, r)
    b_rows = torch.einsum("bqs,qsrd->bqrd", w, b).transpose(1, 2).reshape(rows, r, -1)
    return a_rows, b_rows


def poly_delta(x: Tensor, a_rows: Tensor, b_rows: Tensor, r: int) -> Tensor:
    """``x A_row B_row / r`` for each row of ``x`` (rows, T, d_in): the reference form (PEFT's)."""
    return x.bmm(a_rows).bmm(b_rows) / r


def poly_add(out: Tensor, x: Tensor, a_rows: Tensor, b_rows: Tensor, r: int) -> Tensor:
    """``out + x A_row B_row / r`` with ``out`` (rows, T, d_out) and ``x`` (rows, T, d_in) in the factors' dtype: one
    fused multiply-add for the second product (no separate scale or sum pass over the tokens). When every row
    has the same factors (``a_rows`` / ``b_rows`` given with one row: one task in eval), the rows share one pair
    of GEMMs over all tokens."""
    if a_rows.shape[0] == 1:
        h = x.reshape(-1, x.shape[-1]) @ a_rows[0]
        flat = out.reshape(-1, out.shape[-1])
        return torch.addmm(flat, h, b_rows[0], alpha=1.0 / r).view(out.shape)
    return torch.baddbmm(out, x.bmm(a_rows), b_rows, alpha=1.0 / r)

