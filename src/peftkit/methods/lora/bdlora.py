"""BD-LoRA, block-diagonal LoRA for tensor-parallel multi-LoRA serving (Wang et al. 2025, arXiv 2510.23346):
``LoraConfig(use_bdlora=BdLoraConfig(target_modules_bd_a=..., target_modules_bd_b=..., nblocks=N))``.

The update is LoRA's, ``h = W0 x + s B A x`` (``s = alpha / r``), with one factor block-diagonal with ``N`` blocks:

    A = diag(A_1, ..., A_N),  A_i (r / N, d_in / N)   on targets named by ``target_modules_bd_a`` (row-sharded layers)
    B = diag(B_1, ..., B_N),  B_i (d_out / N, r / N)  on targets named by ``target_modules_bd_b`` (column-sharded)

so shard ``i`` of a tensor-parallel engine computes its part of the update from its own slice of the input (A) or
writes only its own slice of the output (B), without communicating. Only the blocks are stored: peft's
``BlockDiagonalLinear`` layout, the blocks stacked along the rows, under LoRA's keys:

    lora_A.weight  (r, d_in / N)       block i: rows [i r/N, (i+1) r/N), acting on input slice i
    lora_B.weight  (d_out, r / N)      block i: rows [i d_out/N, (i+1) d_out/N), acting on slice i of A x

The dense factor is ``torch.block_diag(*W.chunk(N, 0))``. A target matched by neither list is plain LoRA (with
``match_strict=False``; ``True`` refuses it). Parameters: ``r d_in / N + d_out r`` (A block-diagonal) or
``r d_in + d_out r / N`` (B block-diagonal) per layer.

As peft 0.21.2 (``BdLoraLinearVariant``): names match by substring of the module path; a block-diagonal A starts
Kaiming-uniform (``a = 0``) and a block-diagonal B at zero, whatever ``init_lora_weights`` says (the other factor
follows it); the merge adds ``s B_dense A_dense`` (float32 on the CPU for half precision). Differences: nn.Linear
bases only (peft fails on GPT-2's Conv1D with an AttributeError; peftkit refuses it, and every non-Linear target, at
``get_peft_model`` naming the module); ``nblocks`` not dividing a dimension, or a target matching neither list
under ``match_strict``, fails at ``get_peft_model`` naming the module and the field, before the model changes; inits
derived from the base weight (PiSSA, OLoRA, ...) and ``lora_bias`` are refused in the config (peft would replace a
factor after such an init, or drop / fail on B's bias).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...kernel_helpers import layer_dims
from ...targeting import pattern_value
from . import dispatch
from .layer import LoraAdapter

FIELD = "use_bdlora"


# -- the math (pure functions) ------------------------------------------------------------------------------------
def block_linear(x: Tensor, weight: Tensor, nblocks: int) -> Tensor:
    """``x`` (..., d_in) times the block-diagonal matrix whose ``nblocks`` blocks are stacked in ``weight``
    (d_out, d_in / nblocks): block i maps input slice i to output slice i (peft's ``BlockDiagonalLinear``)."""
    lead = x.shape[:-1]
    x = x.reshape(-1, nblocks, x.shape[-1] // nblocks)  # (n, N, m)
    w = weight.view(nblocks, weight.shape[0] // nblocks, weight.shape[1])  # (N, o, m)
    return torch.einsum("bim,inm->bin", x, w).reshape(*lead, -1)


def dense(weight: Tensor, nblocks: int) -> Tensor:
    """The block-diagonal matrix (d_out, d_in) of stacked blocks ``weight`` (d_out, d_in / nblocks)."""
    return torch.block_diag(*weight.chunk(nblocks, dim=0))


def bdlora_delta(A: Tensor, B: Tensor, scaling: float, nblocks_a: int, nblocks_b: int, dtype: torch.dtype) -> Tensor:
    """``s B A`` (d_out, d_in) with the block-diagonal factor(s) made dense (``nblocks`` 1: a dense factor), in
    peft's order of operations; half precision on the CPU is computed in float32, as peft."""
    A, B = dense(A, nblocks_a), dense(B, nblocks_b)
    if B.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        A, B = A.float(), B.float()
    return ((B @ A) * scaling).to(dtype)


def factor_kind(config: Any, key: str) -> str | None:
    """"A" or "B": which factor of target ``key`` is block-diagonal (peft: ``pattern in target_name``); None: none."""
    bd = config.use_bdlora
    in_a = any(p in key for p in bd.target_modules_bd_a or [])
    in_b = any(p in key for p in bd.target_modules_bd_b or [])
    if in_a and in_b:  # a pattern of each list inside one name (the lists themselves never overlap)
        raise ValueError(f"LoraConfig.use_bdlora: {key} matches both target_modules_bd_a "
                         f"{bd.target_modules_bd_a} and target_modules_bd_b {bd.target_modules_bd_b}; a layer has one "
                         "block-diagonal factor")
    if not (in_a or in_b) and bd.match_strict:
        raise ValueError(f"LoraConfig.use_bdlora.match_strict: {key} matches neither target_modules_bd_a "
                         f"{bd.target_modules_bd_a} nor target_modules_bd_b {bd.target_modules_bd_b}; add a pattern "
                         "naming it, or set match_strict=False to give it plain LoRA")
    return "A" if in_a else "B" if in_b else None


def _check(base: nn.Module, config: Any, key: str) -> tuple[str | None, int, int, int]:
    """(block-diagonal factor, r, d_out, d_in) of a target, or a ValueError naming the module and the field."""
    if not isinstance(base, nn.Linear):  # bitsandbytes' 4- / 8-bit layers are nn.Linear too
        raise ValueError(f"LoraConfig.use_bdlora: BD-LoRA adapts nn.Linear layers only (as peft); {key} is a "
                         f"{type(base).__name__}: leave it out of target_modules")
    kind = factor_kind(config, key)
    r = pattern_value(config.rank_pattern, key, config.r)
    d_out, d_in = layer_dims(base)
    nb = config.use_bdlora.nblocks
    dims = {"A": (("in_features", d_in), ("r", r)), "B": (("r", r), ("out_features", d_out))}.get(kind, ())
    bad = [f"{name}={value}" for name, value in dims if value % nb]
    if bad:
        raise ValueError(f"LoraConfig.use_bdlora.nblocks: a block-diagonal lora_{kind} on {key} needs "
                         f"{' and '.join(n for n, _ in dims)} divisible by nblocks={nb}; {', '.join(bad)} is not "
                         "(choose nblocks dividing both, or another r / rank_pattern entry)")
    return kind, r, d_out, d_in


# -- the adapter -------------------------------------------------------------------------------------------------
class BdLoraAdapter(LoraAdapter):
    """LoRA with a block-diagonal lora_A or lora_B (see the module doc)."""

    def __init__(self, base: nn.Module, config: Any, key: str = "", init: bool = True) -> None:
        key = key or "a target"
        kind, r, d_out, d_in = _check(base, config, key)
        super().__init__(base, config, key, init=init)
        nb = config.use_bdlora.nblocks
        self.bd_factor = kind
        self.nblocks_a = nb if kind == "A" else 1
        self.nblocks_b = nb if kind == "B" else 1
        factory = {"device": self.lora_A.device, "dtype": self.lora_A.dtype}
        if kind == "A":
            self.lora_A = nn.Parameter(torch.empty(r, d_in // nb, **factory))
            if init:
                nn.init.kaiming_uniform_(self.lora_A)  # peft's BlockDiagonalLinear(init_zero=False): a = 0
        elif kind == "B":
            self.lora_B = nn.Parameter(torch.zeros(d_out, r // nb, **factory))  # init_zero=True

    @classmethod
    def param_count(cls, base: nn.Module, config: Any, key: str = "") -> int:
        """``r d_in / N + d_out r`` (A block-diagonal), ``r d_in + d_out r / N`` (B), ``r (d_in + d_out)`` (none)."""
        kind, r, d_out, d_in = _check(base, config, key)
        nb = config.use_bdlora.nblocks
        return r * d_in // (nb if kind == "A" else 1) + d_out * r // (nb if kind == "B" else 1)

    # -- weights ---------------------------------------------------------------------------------------------
    def delta_weight(self, base: nn.Module) -> Tensor:
        dtype = base.weight.dtype if base.weight.is_floating_point() else self.lora_A.dtype
        return bdlora_delta(self.lora_A, self.lora_B, self.scaling, self.nblocks_a, self.nblocks_b, dtype)

    # -- forward ---------------------------------------------------------------------------------------------
    def fused_forward(self, base: nn.Module, x: Tensor) -> Tensor | None:
        return None  # LoRA's fast paths assume dense factors: the path below

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        A, B = self.lora_A, self.lora_B
        if x.dtype != A.dtype:
            x = x.to(A.dtype)
        if self.dropout is not None:
            x = self.dropout(x)
        h = block_linear(x, A, self.nblocks_a) if self.nblocks_a > 1 else F.linear(x, A)  # (..., r)
        if self.nblocks_b == 1 and out.dtype == A.dtype:
            return self._accumulate(base, h, out)
        y = block_linear(h, B, self.nblocks_b) if self.nblocks_b > 1 else F.linear(h, B)
        return out + (y * self.scaling).to(out.dtype)


dispatch.BY_FIELD[FIELD] = BdLoraAdapter
