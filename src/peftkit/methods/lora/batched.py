"""LoRA on a mixed batch (``adapter_names``): every row's adapter in one gathered pass."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ...kernel_helpers import has_hooks
from ...routing import cached_stack
from .kernels import stack_lora


def batched_lora(adapters: list[Any], base: nn.Module, x: Tensor, out: Tensor, index: Tensor, cache: dict
                 ) -> Tensor | None:
    """Mixed batch, BGMV style: ``out_i += x_i A_{k(i)}^T (s_k B_k)^T`` for every row i at once.

    The adapters' ``A`` (r_max, d_in) and ``s B^T`` (r_max, d_out) are stacked once, ranks padded with
    zeros to the largest (exact: the padded rows add zero), plus a zero slot for rows without an
    adapter here; each row gathers its pair and two ``bmm`` run over the batch (the first as
    ``A_i x_i^T``: on CPU about 3x faster than ``x_i A_i^T`` for a small rank). Linear / Conv1D adapters
    without DoRA and with dropout inactive; anything else declines (the generic loop).
    """
    dtype = adapters[0].lora_A.dtype
    for a in adapters:
        if a.kind != "linear" or a.magnitude is not None or a.bias_B is not None or a.lora_A.dtype != dtype:
            return None
        if a.dropout is not None and a.dropout.training:
            return None
    As, Bt = cached_stack(cache, "lora", [t for a in adapters for t in (a.lora_A, a.lora_B)],
                          lambda: stack_lora(adapters), extra=tuple(a.scaling for a in adapters))
    rows = x.shape[0]
    x3 = x.reshape(rows, -1, x.shape[-1])
    if x3.dtype != dtype:
        x3 = x3.to(dtype)
    h = torch.bmm(As.index_select(0, index), x3.transpose(1, 2)).transpose(1, 2)  # (rows, tokens, r_max)
    Bi = Bt.index_select(0, index)  # (rows, r_max, d_out)
    out3 = out.reshape(rows, -1, out.shape[-1])
    if out.dtype != dtype:
        return out + torch.bmm(h, Bi).view(out.shape).to(out.dtype)
    if not torch.is_grad_enabled() and not has_hooks(base) and out3.data_ptr() == out.data_ptr():
        return out3.baddbmm_(h, Bi).view(out.shape)
    return torch.baddbmm(out3, h, Bi).view(out.shape)
