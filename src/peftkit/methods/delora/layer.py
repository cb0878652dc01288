"""DeLoRA (Bini et al. 2025, arXiv 2503.18225): decoupled low-rank adaptation on Linear and GPT-2 Conv1D.

LoRA's update with its direction and strength decoupled: each rank-one term is normalised and a trained
boundary ``lambda`` sets the strength, so that ``||dW||`` stays bounded whatever the factors do. The paper:

    W' = W + dW,    dW = (lambda ||W|| / r) B Xi A,    Xi = diag(1 / (||b_i|| ||a_i||))

with ``A`` (r, d_in), ``B`` (d_out, r), ``a_i`` the rows of ``A`` and ``b_i`` the columns of ``B``.
Hugging Face PEFT (the authors' implementation) reads ``||W||`` per input channel: the pre-trained
weight's column norms ``w_norm`` (d_in,), measured once when the adapter is created and kept as a buffer
(saved in the file, ``delora_w_norm``), scale the update's columns:

    dW = B diag(lambda / r / (||b_i|| ||a_i||)) A diag(w_norm),   the norms clamped at 1e-4

This module follows PEFT (its file keys and numbers): ``delora_A`` (r, d_in), ``delora_B`` (d_out, r),
``delora_lambda`` (1,) trained, ``delora_w_norm`` (d_in,) frozen. ``init_weights=True``: ``A`` Kaiming
uniform, ``B`` zero (the model starts at the base). PEFT's ``module_dropout`` is an element dropout on the
branch's input (not a whole-module skip); the same here. Merging adds ``dW``. Unlike PEFT (0.21), GPT-2's
Conv1D is wrapped too: the factors and ``w_norm`` are laid out as for the equivalent ``nn.Linear`` and
``dW`` is transposed into the base layout.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from ...kernel_helpers import CONV1D_TYPES, adapter_dtype, is_transposed, layer_dims
from ...layers import Adapter
from ...quant import dequantize_weight
from ...registry import register_method
from ...targeting import pattern_value
from . import functional as DF
from .config import DeloraConfig

_SUPPORTED = (nn.Linear,) + CONV1D_TYPES


@register_method(
    "delora",
    config=DeloraConfig,
    category="reparameterized",
    modalities=("text", "vision", "vision-language", "generation"),
    mergeable=True,
    param_formula="r (d_in + d_out) + 1 per target (w_norm frozen)",
    position="weight delta B diag(lambda / r / (|b_i| |a_i|)) A diag(|W_:j|) beside each targeted layer",
    paper="arXiv 2503.18225 (DeLoRA)",
    examples={"delora": {"r": 4, "delora_lambda": 3}},
)
class DeloraAdapter(Adapter):
    supported_layers = _SUPPORTED
    default_roles = ("query", "value")  # PEFT's DeLoRA defaults are its LoRA defaults
    checkpoint_keys: ClassVar[dict[str, str]] = {
        "delora_A": "delora_A", "delora_B": "delora_B", "delora_lambda": "delora_lambda",
        "delora_w_norm": "delora_w_norm",
    }

    def __init__(self, base: nn.Module, config: DeloraConfig, key: str = "", init: bool = True) -> None:
        super().__init__()
        if not isinstance(base, _SUPPORTED):
            raise TypeError(f"{key}: DeLoRA wraps Linear and GPT-2 Conv1D layers, not {type(base).__name__}")
        self.d_out, self.d_in = layer_dims(base)
        self.transposed = is_transposed(base)
        self.r = int(pattern_value(config.rank_pattern, key, config.r))
        lam = pattern_value(config.lambda_pattern, key, config.delora_lambda)
        w = base.weight
        dtype = adapter_dtype(base)  # fp32 on half-precision / quantized bases
        self.delora_A = nn.Parameter(torch.empty(self.r, self.d_in, device=w.device, dtype=dtype))
        self.delora_B = nn.Parameter(torch.empty(self.d_out, self.r, device=w.device, dtype=dtype))
        self.delora_lambda = nn.Parameter(torch.empty(1, device=w.device, dtype=dtype))
        self.register_buffer("delora_w_norm", torch.ones(self.d_in, device=w.device, dtype=dtype))
        self.dropout = nn.Dropout(config.module_dropout) if config.module_dropout > 0 else nn.Identity()
        if init:
            with torch.no_grad():
                nn.init.kaiming_uniform_(self.delora_A, a=math.sqrt(5))
                if config.init_weights:
                    nn.init.zeros_(self.delora_B)
                else:
                    nn.init.kaiming_uniform_(self.delora_B, a=math.sqrt(5))
                self.delora_lambda.fill_(float(lam))
                if not w.is_meta:  # the pre-trained column norms, fixed from now on (a file brings its own)
                    self.delora_w_norm.copy_(DF.column_norms(self._natural(base)))

    def _natural(self, base: nn.Module) -> Tensor:
        """The base weight as (d_out, d_in), float."""
        w = base.weight if base.weight.is_floating_point() else dequantize_weight(base)
        w = w.t() if self.transposed else w
        return w.to(self.delora_w_norm.dtype)

    @classmethod
    def param_count(cls, base: nn.Module, config: DeloraConfig, key: str = "") -> int:
        """Closed form: r (d_in + d_out) + 1 (``w_norm`` is a frozen buffer)."""
        d_out, d_in = layer_dims(base)
        return pattern_value(config.rank_pattern, key, config.r) * (d_in + d_out) + 1

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        a = self.delora_A
        y = DF.delora_apply(self.dropout(x.to(a.dtype)), a, self.delora_B, self.delora_lambda, self.r,
                            self.delora_w_norm)
        return out + y.to(out.dtype)

    def delta_weight(self, base: nn.Module) -> Tensor:
        """``dW`` in the base weight's layout ((d_in, d_out) for GPT-2's Conv1D)."""
        delta = DF.delora_delta(self.delora_A, self.delora_B, self.delora_lambda, self.r, self.delora_w_norm)
        return delta.t() if self.transposed else delta
