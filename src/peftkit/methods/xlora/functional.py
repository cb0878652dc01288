"""X-LoRA's math as pure functions: the scaling head, the per-layer top-k, the experts' weighted sum.

Shapes: hidden ``(b, s, hidden_size)``; scalings ``(b, s, n_layers, n_experts)``; a layer's input ``x``
``(b, s, d_in)`` (an embedding's: token ids ``(b, s)``); expert i: ``A_i (r_i, d_in)``, ``B_i (d_out, r_i)``, scale ``s_i = alpha_i / r_i``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def head_indices(depth: int, dropout: float) -> list[int]:
    """Positions of the head's Linear layers in peft's ``nn.Sequential`` (Linear, ReLU[, Dropout], ..., Linear)."""
    step = 3 if dropout > 0 else 2
    return [i * step for i in range(depth)]


def head_shapes(hidden: int, size: int, depth: int, n_out: int) -> list[tuple[int, int]]:
    """(out, in) of each Linear of the head: hidden -> size -> ... -> size -> n_out (depth 1: hidden -> n_out)."""
    widths = [hidden] + [size] * (depth - 1) + [n_out]
    return [(widths[i + 1], widths[i]) for i in range(depth)]


def head_param_count(hidden: int, size: int, depth: int, n_out: int) -> int:
    """Closed form of the head's parameters: sum over its Linear layers of ``out (in + 1)``."""
    return sum(o * (i + 1) for o, i in head_shapes(hidden, size, depth, n_out))


def head_scalings(hidden: Tensor, weights: list[Tensor], biases: list[Tensor], n_layers: int, n_experts: int,
                  layerwise: bool, softmax: bool, temperature: float, dropout: float, training: bool) -> Tensor:
    """The head on the last hidden state: ``ReLU`` MLP -> logits ``(b, s, n_layers, n_experts)`` (broadcast over
    layers unless ``layerwise``) -> ``softmax(logits / temperature)`` over the experts when ``softmax``."""
    h = hidden
    for i, (w, b) in enumerate(zip(weights, biases)):
        h = F.linear(h, w, b)
        if i < len(weights) - 1:
            h = F.relu(h)
            if dropout > 0:
                h = F.dropout(h, dropout, training)
    bsz, seq = hidden.shape[:2]
    if not layerwise:
        h = h.unsqueeze(2).expand(-1, -1, n_layers, -1)
    scalings = h.reshape(bsz, seq, n_layers, n_experts)
    if softmax:
        scalings = torch.softmax(scalings / temperature, dim=-1)
    return scalings


def layer_weights(scalings: Tensor, top_k: int | None, softmax_topk: bool) -> Tensor:
    """One layer's expert weights ``(b, s, n_experts)`` from its slice of the scalings: the top-k kept (the rest
    zero), then, with ``softmax_topk``, a softmax over the kept (non-zero) ones (peft's order of operations)."""
    if top_k is not None:
        _, idx = torch.topk(scalings, k=top_k, dim=-1)
        mask = torch.zeros_like(scalings, dtype=torch.bool).scatter_(-1, idx, True)
        scalings = scalings * mask.to(scalings.dtype)
    if softmax_topk:
        nonzero = scalings != 0
        scalings = torch.softmax(scalings.masked_fill(~nonzero, float("-inf")), dim=-1).masked_fill(~nonzero, 0.0)
    return scalings


def mixture(x: Tensor, As: list[Tensor], Bs: list[Tensor], scales: list[float], weights: Tensor | None,
            factor: float) -> Tensor:
    """``factor sum_i s_i B_i A_i (w_i * x)`` with ``w_i`` the per-token weight ``weights[..., i]`` (None: 1).

    The per-token weight commutes with ``A_i``, so it is applied on the rank side: one GEMM with the
    concatenated ``A`` (``sum r_i`` columns), a per-(token, rank) multiply, one GEMM with the concatenated ``B``;
    no ``(b, s, d_in)`` copy of the input per expert."""
    A = torch.cat(As, 0) if len(As) > 1 else As[0]
    return _rank_mix(x @ A.t(), As, Bs, scales, weights, factor)


def embedding_mixture(ids: Tensor, As: list[Tensor], Bs: list[Tensor], scales: list[float], weights: Tensor | None,
                      factor: float, base: torch.nn.Embedding, embed_scale: Tensor | None = None) -> Tensor:
    """On an embedding (token ids ``(b, s)``, ``A_i (r_i, num_embeddings)``, ``B_i (dim, r_i)``):
    ``factor sum_i s_i (w_i * A_i^T[ids]) B_i^T``, times the base's ``embed_scale`` when it has one (peft's
    ``XLoraEmbeddingLayer``: the per-token weight multiplies the looked-up rank vectors; no dropout). Each ``A_i``
    is looked up with the base's ``padding_idx`` / ``max_norm`` options, as LoRA's embedding does."""
    opts = (base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse)
    h = torch.cat([F.embedding(ids, a.t(), *opts) for a in As], -1)
    out = _rank_mix(h, As, Bs, scales, weights, factor)
    return out if embed_scale is None else out * embed_scale.to(out.dtype)


def _rank_mix(h: Tensor, As: list[Tensor], Bs: list[Tensor], scales: list[float], weights: Tensor | None,
              factor: float) -> Tensor:
    """``h`` (the concatenated ``A_i`` outputs, ``sum r_i`` wide) times ``factor s_i w_i`` per rank column, then
    the concatenated ``B``."""
    B = torch.cat(Bs, 1) if len(Bs) > 1 else Bs[0]
    ranks = [a.shape[0] for a in As]
    col = torch.tensor([s * factor for s, r in zip(scales, ranks) for _ in range(r)], dtype=h.dtype, device=h.device)
    if weights is None:
        h = h * col
    else:
        which = torch.tensor([i for i, r in enumerate(ranks) for _ in range(r)], device=h.device)
        h = h * (weights.to(h.dtype).index_select(-1, which) * col)
    return h @ B.t()


def mixture_reference(x: Tensor, As: list[Tensor], Bs: list[Tensor], scales: list[float], weights: Tensor | None,
                      factor: float, dropouts: list | None = None) -> Tensor:
    """peft's loop, term by term: ``sum_i factor s_i B_i A_i dropout_i(w_i * x)`` (the path with expert dropout in
    training, where each expert draws its own mask, and the check of ``mixture``)."""
    out = 0
    for i, (a, b, s) in enumerate(zip(As, Bs, scales)):
        xi = x if weights is None else x * weights[..., i : i + 1].to(x.dtype)
        if dropouts is not None and dropouts[i] is not None:
            xi = dropouts[i](xi)
        out = out + (xi @ a.t()) @ b.t() * (s * factor)
    return out
