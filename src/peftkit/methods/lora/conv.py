"""LoRA and DoRA on convolutions (Conv1d / Conv2d / Conv3d, grouped or not), in PEFT's layout.

``A`` is a full convolution ``c_in -> r`` with the base's kernel, stride, padding and dilation, weight
(r, c_in, *k); ``B`` is a 1x1 convolution ``r -> c_out`` with the base's ``groups``, weight
(c_out, r / groups, 1, ...). The update is ``s B(A(x))``.

- ``groups == 1``: the update is the kernel ``s B A`` of the base's shape (``functional.lora_delta``) and
  merges like any LoRA delta.
- ``groups > 1`` (PEFT's layout): output channel ``o`` of group ``g`` reads the
  ``r / groups`` channels of ``A``'s output of that group, but ``A`` sees every input channel, so the update
  is a dense (c_out, c_in, *k) kernel. The grouped base weight (c_out, c_in / groups, *k) has no place for
  it: the adapter cannot be merged (PEFT refuses too), and the rank must be a multiple of ``groups``.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from .functional import along, norm_except

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def conv_fn(base: nn.Module):
    """``F.conv1d`` / ``conv2d`` / ``conv3d`` for the base's number of spatial dimensions."""
    return _CONV_FN[len(base.kernel_size)]


def factor_shapes(base: nn.Module, r: int, key: str = "") -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of ``A`` (r, c_in, *k) and ``B`` (c_out, r / groups, 1, ...)."""
    groups = base.groups
    if r % groups:
        raise ValueError(
            f"{key}: LoRA rank {r} on a {type(base).__name__} with groups={groups}: the rank must be divisible by "
            "groups (as in PEFT); choose another rank (rank_pattern) or leave this layer out"
        )
    ones = (1,) * len(base.kernel_size)
    return (r, base.in_channels, *base.kernel_size), (base.out_channels, r // groups, *ones)


def param_count(base: nn.Module, r: int) -> int:
    """``r c_in prod(k) + c_out r / groups``."""
    return r * base.in_channels * math.prod(base.kernel_size) + base.out_channels * (r // base.groups)


def refuse_merge(groups: int, key: str) -> None:
    """A grouped base has no place for the dense update (see the module docstring)."""
    if groups > 1:
        raise NotImplementedError(
            f"{key or 'LoRA'}: LoRA on a grouped convolution (groups={groups}) cannot be merged: "
            "its update is a dense kernel over every input channel, which the grouped weight cannot hold "
            "(PEFT refuses too); keep the adapter unmerged"
        )


def lora_output(x: Tensor, A: Tensor, B: Tensor, base: nn.Module, scaling: float) -> Tensor:
    """``s B(A(x))``: A with the base's stride, padding and dilation, B 1x1 with the base's groups."""
    conv = conv_fn(base)
    h = conv(x, A, None, base.stride, base.padding, base.dilation)
    return conv(h, B, None, 1, 0, 1, base.groups) * scaling


def dora_norm(w0: Tensor, A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """DoRA's norm per output channel, PEFT's formula: ``||W0 + s reshape(B' A')||`` over all axes but the
    first, with ``B'`` = B viewed (-1, r), ``A'`` = A viewed (r, -1) and the product reshaped to W0's shape.

    Ungrouped, ``B' A'`` is ``B A`` (the paper's norm of the merged kernel). Grouped, ``B'`` (c_out / groups, r)
    pairs ``groups`` rows of B side by side, so the product is not the (dense, unmergeable) update: this is
    the value PEFT's ``get_lora_weight`` computes, kept so that adapters behave the same in both libraries."""
    r = A.shape[0]
    paired = (B.reshape(-1, r) @ A.reshape(r, -1)).reshape(w0.shape)
    return norm_except(w0 + scaling * paired, 0)


def dora_output(out: Tensor, lora: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """``scale (out - b + lora) + b`` (``lora`` already scaled by s), in ``out``'s dtype."""
    if bias is None:
        return (out * scale + lora * scale).to(out.dtype)
    b = along(bias, out.dim(), 1)
    return ((out - b) * scale + lora * scale + b).to(out.dtype)
