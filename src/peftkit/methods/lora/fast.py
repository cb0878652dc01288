"""LoRA's fast paths beside the reference forward of ``layer.py`` (same numbers, fewer passes; the reference
path is the definition, the contract suite and the kernel tests compare against it).

- ``fused_forward``: base and adapter in one pass for a plain Linear / GPT-2 Conv1D base without hooks. The base
  output, computed on the 2-D view of ``x`` (a fresh tensor its backward does not keep), takes ``s h B^T`` in
  place (``kernels.LoraLinear`` / ``DoraLinear``).
- ``merged_weight_forward``: inference on many tokens forms ``W0 + s B A`` in a per-thread scratch buffer and
  runs one GEMM (``d_out d_in r`` multiply-adds against ``n r (d_in + d_out)`` in skinny GEMMs); the base is
  never modified.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...kernel_helpers import has_hooks, scratch
from ...targeting import LINEAR_TYPES
from .kernels import DoraLinear, LoraLinear

# ``adapter`` below is a ``LoraAdapter`` (layer.py, which calls these): its factors, scaling, dropout, magnitude


def fused_forward(adapter: Any, base: nn.Module, x: Tensor) -> Tensor | None:
    """``base(x)`` plus the adapter in one pass, or None where the fast path does not apply (the layer then
    runs the reference path)."""
    transposed = type(base) is not nn.Linear
    if adapter.kind != "linear" or type(base) not in LINEAR_TYPES or transposed != adapter.fan_in_fan_out:
        return None
    if adapter.bias_B is not None:
        return None
    w, A = base.weight, adapter.lora_A
    if x.dtype != w.dtype or A.dtype != w.dtype or has_hooks(base) or torch.is_autocast_enabled(x.device.type):
        return None  # under autocast the generic path lets autocast pick each op's dtype
    d_out, d_in = adapter._dims(base)
    x2d = x.reshape(-1, d_in)
    compiling = torch.compiler.is_compiling()
    if not torch.is_grad_enabled() and not compiling and x2d.shape[0] * (d_in + d_out) >= d_in * d_out:
        return merged_weight_forward(adapter, base, x2d, transposed).view(*x.shape[:-1], d_out)
    xd = adapter.dropout(x2d) if adapter.dropout is not None else None
    if adapter.magnitude is not None:
        scale = adapter._dora_scale(base)
        out = DoraLinear.apply(x2d, xd, w, base.bias, A, adapter.lora_B, scale, adapter.scaling, transposed)
    else:
        out = LoraLinear.apply(x2d, xd, w, base.bias, A, adapter.lora_B, adapter.scaling, transposed)
    return out.view(*x.shape[:-1], d_out)


def merged_weight_forward(adapter: Any, base: nn.Module, x2d: Tensor, transposed: bool) -> Tensor:
    """``x2d (W0 + s B A)^T + b`` (DoRA: the merged weight rescaled) with one GEMM; no autograd."""
    w = base.weight
    buf = scratch(tuple(w.shape), w)
    if transposed:  # Conv1D keeps (d_in, d_out)
        merged = torch.addmm(w, adapter.lora_A.t(), adapter.lora_B.t(), alpha=adapter.scaling, out=buf)
    else:
        merged = torch.addmm(w, adapter.lora_B, adapter.lora_A, alpha=adapter.scaling, out=buf)
    if adapter.magnitude is not None:
        scale = adapter._dora_scale(base)
        merged.mul_(scale[None, :] if transposed else scale[:, None])
    if transposed:
        return torch.addmm(base.bias, x2d, merged) if base.bias is not None else x2d @ merged
    return F.linear(x2d, merged, base.bias)
