"""GLoRA weight math as pure functions on tensors (no modules, no state).

Everything is in the ``nn.Linear`` layout: ``w0`` (d_out, d_in), ``b0`` (d_out,). A path's value is a tensor
that broadcasts against its target, or None when the path is off (``"none"``, or a bias path on a bias-free
layer): A, B broadcast to (d_out, d_in) ((d_out, d_in), (d_out, 1) or a 0-d scalar), C is (d_in, 1), D, E
broadcast to (d_out,) ((d_out,) or a 0-d scalar).
"""

from __future__ import annotations

from torch import Tensor


def weight_delta(w0: Tensor, a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """``W0 * A + B`` (d_out, d_in), or None when both paths are off."""
    if a is None:
        return None if b is None else b.expand_as(w0)
    delta = w0 * a
    return delta if b is None else delta + b


def bias_delta(w0: Tensor, b0: Tensor, c: Tensor | None, d: Tensor | None, e: Tensor | None) -> Tensor | None:
    """``b0 * D + E + W0 C`` (d_out,), or None when every bias path is off."""
    terms = []
    if d is not None:
        terms.append(b0 * d)
    if e is not None:
        terms.append(e.expand_as(b0))
    if c is not None:
        terms.append((w0 @ c).squeeze(-1))
    if not terms:
        return None
    out = terms[0]
    for t in terms[1:]:
        out = out + t
    return out


def merge_weight(w0: Tensor, a: Tensor | None, b: Tensor | None) -> Tensor:
    """``W0 + (W0 * A + B)`` (PEFT's order of additions)."""
    delta = weight_delta(w0, a, b)
    return w0.clone() if delta is None else w0 + delta


def unmerge_weight(w: Tensor, a: Tensor | None, b: Tensor | None) -> Tensor:
    """``(W - B) / (1 + A)``: the inverse of ``merge_weight`` (up to rounding)."""
    out = w if b is None else w - b
    return out.clone() if a is None else out / (1.0 + a)


def merge_bias(b0: Tensor, delta: Tensor | None) -> Tensor:
    return b0.clone() if delta is None else b0 + delta


def unmerge_bias(b: Tensor, d: Tensor | None, e: Tensor | None, wc: Tensor | None) -> Tensor:
    """``(b - E - W0 C) / (1 + D)``, given ``W0 C`` (d_out,) as it was at the merge."""
    out = b
    if e is not None:
        out = out - e
    if wc is not None:
        out = out - wc
    return out.clone() if d is None else out / (1.0 + d)
