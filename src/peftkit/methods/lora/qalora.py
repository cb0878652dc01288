"""QALoRA, quantization-aware low-rank adaptation (Xu et al. 2023, arXiv 2309.14717):
``LoraConfig(use_qalora=True, qalora_group_size=g)``.

lora_A sees the input averaged over groups of ``g`` consecutive features, one value per quantization group of the
base weight, so that the merged update is constant within each group (it can be folded into a group-wise quantized
base's zero points). With ``P = d_in / g`` groups, as peft's ``QALoraLinearVariant.forward``:

    p_j = P * mean(x[j g : (j+1) g])      (j < P; peft's "x_pooled * pooled_features")
    h   = W0 x + s B A p                  A (r, P), B (d_out, r), s = alpha / r (rsLoRA: alpha / sqrt(r))

File keys are LoRA's, ``lora_A.weight`` (r, d_in / g) and ``lora_B.weight`` (d_out, r): peft's layout, so a file
written by peft's QALoRA (GPTQ bases) loads here and the other way round. A starts as an ``nn.Linear(d_in / g, r)``
weight (Kaiming-uniform, ``a = sqrt(5)``), whatever ``init_lora_weights`` says; B follows ``init_lora_weights``
(zero by default: the identity at the start). Parameters: ``r d_in / g + d_out r`` per layer.

peft builds QALoRA only on GPTQ layers (``GPTQLoraLinear``; on other layers ``use_qalora`` is ignored). peftkit
builds it on nn.Linear and on bitsandbytes 4- / 8-bit bases (``peftkit.quant``), with the same math and file.
Differences: peft refuses to merge (``NotImplementedError`` for GPTQ); on these bases the update is a dense matrix,
``s B A_dense`` with ``A_dense = repeat_interleave(A, g, dim=1) * P / g`` (column k of ``A_dense`` is
``P / g * A[:, k // g]``), so merge and unmerge work through the wrapper (bit-exact unmerge on float bases; a
quantized base is re-quantized and its original packing restored on unmerge, as every LoRA merge there).
``in_features`` not divisible by ``g`` fails at ``get_peft_model`` naming the module and ``qalora_group_size``
(peft: when building the layer).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ...kernel_helpers import layer_dims
from ...targeting import pattern_value
from . import dispatch
from .layer import LoraAdapter

FIELD = "use_qalora"


# -- the math (pure functions) ------------------------------------------------------------------------------------
def pool(x: Tensor, group_size: int) -> Tensor:
    """``P * mean`` of each group of ``group_size`` features: (..., d_in) -> (n, P), n the leading dims flattened."""
    x = x.reshape(-1, x.shape[-1])
    pooled = x.shape[-1] // group_size
    return x.view(x.shape[0], pooled, group_size).mean(dim=2) * pooled


def qalora_output(x: Tensor, A: Tensor, B: Tensor, scaling: float, group_size: int) -> Tensor:
    """The adapter's term ``s B A pool(x)`` (..., d_out), in peft's order of operations."""
    delta = pool(x, group_size) @ A.t() @ B.t() * scaling
    return delta.view(*x.shape[:-1], delta.shape[-1])


def dense_A(A: Tensor, group_size: int) -> Tensor:
    """(r, d_in): the dense lora_A the pooling stands for, ``repeat_interleave(A, g, dim=1) * P / g``."""
    pooled = A.shape[1]
    return A.repeat_interleave(group_size, dim=1) * (pooled / group_size)


def qalora_delta(A: Tensor, B: Tensor, scaling: float, group_size: int, dtype: torch.dtype) -> Tensor:
    """``s B A_dense`` (d_out, d_in); half precision on the CPU is computed in float32."""
    if B.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        A, B = A.float(), B.float()
    return ((B @ dense_A(A, group_size)) * scaling).to(dtype)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _check(base: nn.Module, config: Any, key: str) -> tuple[int, int, int]:
    """(r, d_out, d_in) of a target, or a ValueError naming the module and the field."""
    if not isinstance(base, nn.Linear):  # bitsandbytes' 4- / 8-bit layers are nn.Linear too
        raise ValueError(f"LoraConfig.use_qalora: QALoRA adapts nn.Linear layers (plain or bitsandbytes 4- / 8-bit) "
                         f"only; {key} is a {type(base).__name__}: leave it out of target_modules")
    d_out, d_in = layer_dims(base)
    size = config.qalora_group_size
    if d_in % size:
        raise ValueError(f"LoraConfig.qalora_group_size: QALoRA on {key} needs in_features ({d_in}) divisible by "
                         f"qalora_group_size={size}; allowed values for it: {_divisors(d_in)} (or leave it out of "
                         "target_modules)")
    return pattern_value(config.rank_pattern, key, config.r), d_out, d_in


# -- the adapter -------------------------------------------------------------------------------------------------
class QaLoraAdapter(LoraAdapter):
    """LoRA whose lora_A acts on the group-averaged input (see the module doc)."""

    def __init__(self, base: nn.Module, config: Any, key: str = "", init: bool = True) -> None:
        key = key or "a target"
        r, _, d_in = _check(base, config, key)
        super().__init__(base, config, key, init=init)
        self.group_size = config.qalora_group_size
        A = self.lora_A
        self.lora_A = nn.Parameter(torch.empty(r, d_in // self.group_size, device=A.device, dtype=A.dtype))
        if init:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # peft: a new nn.Linear(d_in / g, r)

    @classmethod
    def param_count(cls, base: nn.Module, config: Any, key: str = "") -> int:
        """``r d_in / g + d_out r``."""
        r, d_out, d_in = _check(base, config, key)
        return r * (d_in // config.qalora_group_size) + d_out * r

    # -- weights ---------------------------------------------------------------------------------------------
    def delta_weight(self, base: nn.Module) -> Tensor:
        dtype = base.weight.dtype if base.weight.is_floating_point() else self.lora_A.dtype
        return qalora_delta(self.lora_A, self.lora_B, self.scaling, self.group_size, dtype)

    # -- forward ---------------------------------------------------------------------------------------------
    def fused_forward(self, base: nn.Module, x: Tensor) -> Tensor | None:
        return None  # LoRA's fast paths apply A to x itself: the path below

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        A = self.lora_A
        if x.dtype != A.dtype:
            x = x.to(A.dtype)
        if self.dropout is not None:
            x = self.dropout(x)
        return out + qalora_output(x, A, self.lora_B, self.scaling, self.group_size).to(out.dtype)


dispatch.BY_FIELD[FIELD] = QaLoraAdapter
