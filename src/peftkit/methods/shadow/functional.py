"""ShadowPEFT's tensor math as pure functions (the paper's Eq. 2-9; see ``layer.py`` for the method).

Shapes: ``h``, ``s`` (batch, seq, d); ``W_down`` (r, d), ``W_up`` (d, r); the update MLPs ``T``, ``G`` are
``Linear(d, u) -> GELU -> Linear(u, d)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def inject(h: Tensor, s: Tensor, down: Tensor, up: Tensor, alpha: float,
           dropout: Callable[[Tensor], Tensor] = lambda t: t) -> Tensor:
    """Eq. 2-4: ``h + alpha * Dropout(h - s) W_down^T W_up^T``, the correction computed in the adapter's dtype
    and added in ``h``'s."""
    delta = dropout((h - s).to(down.dtype))  # Eq. 2 (and Eq. 3's dropout)
    delta = F.linear(F.linear(delta, down), up)  # Eq. 3
    return h + (alpha * delta).to(h.dtype)  # Eq. 4


def update(h: Tensor, s: Tensor, transform: Callable[[Tensor], Tensor], gate: Callable[[Tensor], Tensor],
           dtype: torch.dtype) -> Tensor:
    """Eq. 5-7: ``g = sigmoid(G(h))``, ``s' = (1 - g) s + g T(h)``, computed in ``dtype`` (the adapter's), returned
    in ``s``'s dtype."""
    x = h.to(dtype)
    candidate = transform(x)  # Eq. 5
    g = torch.sigmoid(gate(x))  # Eq. 6
    return ((1.0 - g) * s.to(dtype) + g * candidate).to(s.dtype)  # Eq. 7


def pool_last_token(hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
    """The hidden state of each row's last non-padding token (left or right padding)."""
    if attention_mask is None:
        return hidden[:, -1, :]
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    last = (attention_mask.ne(0) * positions).argmax(dim=-1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def sequence_classification_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """transformers' sequence-classification loss: regression (one label), single- or multi-label."""
    n = logits.shape[-1]
    if n == 1:
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).view(-1))
    if labels.dtype in (torch.long, torch.int):
        return F.cross_entropy(logits.view(-1, n), labels.view(-1))
    return F.binary_cross_entropy_with_logits(logits, labels)


def shifted_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Next-token cross entropy (labels shifted by one, -100 ignored)."""
    shift_logits = logits[..., :-1, :].contiguous()
    shift_labels = labels[..., 1:].contiguous()
    return F.cross_entropy(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1), ignore_index=-100)
