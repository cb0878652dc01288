"""WaveFT's weight math as pure functions.

A one-level inverse 2-D discrete wavelet transform of a sparse coefficient matrix is a sum of separable
``L x L`` patches (``L``: the wavelet's filter length), one per non-zero coefficient: coefficient ``c`` at
position ``(i, k)`` of a sub-band adds ``c f_r[j] f_c[l]`` at ``(2 i + j, 2 k + l)`` of the reconstruction, with
``f_r`` / ``f_c`` the reconstruction low- or high-pass filter of its sub-band along rows / columns. The update
is therefore a scatter of ``n L^2`` values into a zero matrix (no dense spectrum, no convolution over the whole
grid): :func:`patches` lays out where each coefficient lands and with which weight, once per layer, and
:func:`scatter_delta` builds the update from the trained coefficients. The layout reproduces Hugging Face
PEFT's route (a padded dense spectrum, split into four sub-bands, ``waverec2d`` as a stride-2 transposed
convolution with PyWavelets' filters, then the centre crop) entry for entry.
"""

from __future__ import annotations

import torch
from torch import Tensor

MISSING_PYWT = ('WaveFT needs PyWavelets (the `pywt` module) for its wavelet filters: pip install "peftkit[wavelets]" '
                "(or pip install PyWavelets)")


def coefficient_positions(d_out: int, d_in: int, n: int, seed: int) -> tuple[Tensor, Tensor]:
    """(rows, cols) of the ``n`` learned coefficients in the ``d_out x d_in`` grid: PEFT's draw, the first ``n``
    entries of ``randperm(d_out * d_in)`` under ``seed``."""
    flat = torch.randperm(d_out * d_in, generator=torch.Generator().manual_seed(seed))[:n]
    return flat // d_in, flat % d_in


def wavelet_filters(family: str) -> tuple[list[float], list[float]]:
    """PyWavelets' reconstruction filters ``(rec_lo, rec_hi)`` of ``family``; ImportError without PyWavelets."""
    try:
        import pywt
    except ImportError as err:
        raise ImportError(MISSING_PYWT) from err
    wavelet = pywt.Wavelet(family)
    return list(wavelet.rec_lo), list(wavelet.rec_hi)


def padded_grid(d_out: int, d_in: int, filter_len: int) -> tuple[int, int]:
    """The spectrum grid PEFT reconstructs from: each side grown by ``filter_len - 2`` (the transform's
    shrinkage), then rounded up to even."""
    p_out, p_in = d_out + filter_len - 2, d_in + filter_len - 2
    return p_out + p_out % 2, p_in + p_in % 2


def patches(rows: Tensor, cols: Tensor, d_out: int, d_in: int, filters: tuple[list[float], list[float]] | None,
            transposed: bool = False) -> tuple[Tensor, Tensor]:
    """Where each coefficient lands in the update and with which weight: ``(pos, weight)``, both ``(n, P)``.

    ``pos``: flat indices into the ``d_out x d_in`` update (into its ``d_in x d_out`` transpose when
    ``transposed``, GPT-2's Conv1D layout); ``weight``: float64 products of the filter taps, 0 where a patch
    entry falls outside the update (its index then points at entry 0). ``filters=None`` (``use_idwt=False``):
    each coefficient is its own entry (``P = 1``, weight 1).

    With filters ``(lo, hi)`` of length ``L`` (``P = L^2``): the coefficient's position in PEFT's padded grid
    (``padded_grid``, the ``d_out x d_in`` grid centred in it) picks its sub-band: the top-left quarter is the
    approximation (low-pass along both axes), the top-right the ``lh`` band (rows high-pass), the bottom-left
    ``hl`` (columns high-pass), the bottom-right ``hh``; its position ``(i, k)`` inside the quarter puts its
    ``L x L`` patch at rows ``2 i - pad .. 2 i - pad + L - 1`` (``pad = (2 L - 3) // 2``, then PEFT's centre crop).
    """
    rows, cols = rows.long(), cols.long()
    if filters is None:
        r, c = rows[:, None], cols[:, None]
        w = torch.ones(rows.shape[0], 1, dtype=torch.float64)
    else:
        lo, hi = (torch.tensor(f, dtype=torch.float64) for f in filters)
        L = lo.numel()
        p_out, p_in = padded_grid(d_out, d_in, L)
        h2, w2 = p_out // 2, p_in // 2
        big_r = rows + (p_out - d_out) // 2
        big_c = cols + (p_in - d_in) // 2
        bottom, right = big_r >= h2, big_c >= w2
        i0, k0 = big_r - h2 * bottom, big_c - w2 * right
        pad = (2 * L - 3) // 2
        # the reconstruction is (p - L + 2) wide; PEFT crops it to the layer's size from the centre
        start_r, start_c = (p_out - L + 2 - d_out) // 2, (p_in - L + 2 - d_in) // 2
        taps = torch.arange(L)
        r = (2 * i0 - pad - start_r)[:, None, None] + taps[None, :, None]  # (n, L, 1)
        c = (2 * k0 - pad - start_c)[:, None, None] + taps[None, None, :]  # (n, 1, L)
        f_r = torch.where(right[:, None], hi, lo)  # rows: high-pass for the right half (lh, hh)
        f_c = torch.where(bottom[:, None], hi, lo)  # columns: high-pass for the bottom half (hl, hh)
        w = f_r[:, :, None] * f_c[:, None, :]
        r, c = r.expand_as(w), c.expand_as(w)
    inside = (r >= 0) & (r < d_out) & (c >= 0) & (c < d_in)
    pos = torch.where(inside, c * d_out + r if transposed else r * d_in + c, 0)
    w = torch.where(inside, w, 0.0)
    n = rows.shape[0]
    return pos.reshape(n, -1), w.reshape(n, -1)


def scatter_delta(spectrum: Tensor, pos: Tensor, weight: Tensor, shape: tuple[int, int], scaling: float) -> Tensor:
    """The update ``scaling x IDWT2(S)`` of ``shape`` (the layer's ``(d_out, d_in)``, or its transpose matching
    ``pos``): the sum of every coefficient's weighted patch, in the spectrum's dtype."""
    values = (spectrum * scaling)[:, None] * weight.to(spectrum.dtype)
    flat = torch.zeros(shape[0] * shape[1], device=spectrum.device, dtype=spectrum.dtype)
    return flat.index_add(0, pos.reshape(-1), values.reshape(-1)).view(shape)


def proportional_allocation(dims: dict[str, tuple[int, int]], n_frequency: int) -> dict[str, int]:
    """PEFT's ``proportional_parameters``: the budget ``n_frequency x len(dims)`` shared in proportion to each
    layer's ``d_out d_in`` (``dims``: path -> (d_out, d_in)), rounded, at least 1 per layer."""
    total = sum(d_out * d_in for d_out, d_in in dims.values())
    budget = n_frequency * len(dims)
    return {path: max(1, round((d_in * d_out) / total * budget)) for path, (d_out, d_in) in dims.items()}
