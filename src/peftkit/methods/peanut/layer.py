"""PEANuT (Zhong et al. 2024, arXiv 2410.01870): a weight-aware neural tweaker on Linear and GPT-2 Conv1D.

LoRA's update does not look at the weight it updates. PEANuT makes the update a learned function of the
frozen pre-trained weight ``W`` (d_out, d_in): a small network ``f`` reads each input channel's weight row
(the rows of ``W^T``, length d_out) and outputs that row of the update,

    W' = W + dW,    dW^T = s * f(W^T),
    f(W^T) = sigma(... sigma(W^T A^T) ...) B^T

with ``A`` (r, d_out) the input projection, ``depth`` encoder layers ``E_i`` (r, r) and as many decoder layers
``D_i`` (r, r) with residual connections (encoder inputs added back after the matching decoders), the
activation ``sigma`` (``act_fn``), ``B`` (d_out, r) the output projection and ``s`` the ``scaling``. Every
network weight trains; ``W`` is frozen. ``init_weights=True``: ``B`` starts at zero (so ``dW = 0``: the model
starts at the base), the other layers Kaiming uniform.

The forward never forms ``dW``: with ``H = f`` before ``B`` (d_in, r), ``x dW^T = s (x H) B^T``, two rank-r
products (PEFT forms the dense d_in x d_out update and multiplies by it). ``H`` depends on ``W``, so it is
computed from the layer's weight on every call (one d_in x d_out x r product, as in PEFT).

This module follows PEFT 0.21 (its file keys and numbers): ``peanut_A.weight`` (r, d_out),
``peanut_B.weight`` (d_out, r), ``peanut_encoders.<i>.weight`` and ``peanut_decoders.<i>.weight`` (r, r).
Merging adds ``dW`` computed from the weight being merged into; the merge keeps ``H`` (d_in x r, not the whole
weight as PEFT does) so unmerge subtracts the same ``dW``, bit-exact through the wrapper's restore record.
Differences from PEFT: GPT-2's Conv1D is wrapped too (PEFT wraps nn.Linear only), read as the equivalent
nn.Linear; with several PEANuT adapters merged into one layer, each later one reads the weight with the earlier
ones merged (PEFT reads the weight from before the first merge).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from transformers.activations import ACT2FN

from ...kernel_helpers import CONV1D_TYPES, adapter_dtype, is_transposed, layer_dims
from ...layers import Adapter
from ...quant import dequantize_weight
from ...registry import register_method
from . import functional as PF
from .config import PeanutConfig

_SUPPORTED = (nn.Linear,) + CONV1D_TYPES


@register_method(
    "peanut",
    config=PeanutConfig,
    category="reparameterized",
    modalities=("text", "vision", "vision-language", "generation"),
    mergeable=True,
    param_formula="2 r d_out + 2 depth r^2 per target",
    position="weight delta s f(W^T)^T from a small network f reading the frozen weight, beside each targeted layer",
    paper="arXiv 2410.01870 (PEANuT)",
    examples={"peanut": {"r": 4, "depth": 1, "act_fn": "gelu"}},
)
class PeanutAdapter(Adapter):
    supported_layers = _SUPPORTED
    default_roles = ("query", "value")  # PEFT's PEANuT defaults are its LoRA defaults

    def __init__(self, base: nn.Module, config: PeanutConfig, key: str = "", init: bool = True) -> None:
        super().__init__()
        if not isinstance(base, _SUPPORTED):
            raise TypeError(f"{key}: PEANuT wraps Linear and GPT-2 Conv1D layers, not {type(base).__name__}")
        self.d_out, self.d_in = layer_dims(base)
        self.transposed = is_transposed(base)
        self.r, self.depth, self.scaling = config.r, config.depth, float(config.scaling)
        self.act_fn = config.act_fn
        self.__dict__["_act"] = ACT2FN[config.act_fn]  # a parameter-free callable, not a submodule
        w = base.weight
        dtype = adapter_dtype(base)  # fp32 on half-precision / quantized bases

        def new(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, device=w.device, dtype=dtype))

        self.peanut_A, self.peanut_B = new(self.r, self.d_out), new(self.d_out, self.r)
        self.checkpoint_keys = {"peanut_A": "peanut_A.weight", "peanut_B": "peanut_B.weight"}
        for side in ("encoders", "decoders"):
            for i in range(self.depth):
                setattr(self, f"peanut_{side}_{i}", new(self.r, self.r))
                self.checkpoint_keys[f"peanut_{side}_{i}"] = f"peanut_{side}.{i}.weight"
        if init:
            with torch.no_grad():
                for name in self.checkpoint_keys:  # PEFT: every layer Kaiming uniform, then B zero
                    nn.init.kaiming_uniform_(getattr(self, name), a=math.sqrt(5))
                if config.init_weights:
                    nn.init.zeros_(self.peanut_B)

    @property
    def encoders(self) -> list[Tensor]:
        return [getattr(self, f"peanut_encoders_{i}") for i in range(self.depth)]

    @property
    def decoders(self) -> list[Tensor]:
        return [getattr(self, f"peanut_decoders_{i}") for i in range(self.depth)]

    @classmethod
    def param_count(cls, base: nn.Module, config: PeanutConfig, key: str = "") -> int:
        """Closed form: ``A`` and ``B`` (r d_out each) and 2 depth r x r hidden layers."""
        d_out, _ = layer_dims(base)
        return 2 * config.r * d_out + 2 * config.depth * config.r * config.r

    def _hidden(self, weight: Tensor) -> Tensor:
        """``H`` (d_in, r) from a weight in the base layer's layout."""
        w_t = weight if self.transposed else weight.t()
        return PF.tweak(w_t.to(self.peanut_A.dtype), self.peanut_A, self.encoders, self.decoders, self._act)

    def _base_weight(self, base: nn.Module) -> Tensor:
        return base.weight if base.weight.is_floating_point() else dequantize_weight(base)

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        h = self._hidden(self._base_weight(base))
        y = PF.peanut_apply(x.to(h.dtype), h, self.peanut_B, self.scaling)
        return out.add_(y.to(out.dtype))  # ``out`` is ours to accumulate into (Adapter.forward)

    def _delta(self, h: Tensor) -> Tensor:
        delta = PF.peanut_delta(h, self.peanut_B, self.scaling)
        return delta.t() if self.transposed else delta

    def delta_weight(self, base: nn.Module) -> Tensor:
        """``dW`` in the base weight's layout ((d_in, d_out) for GPT-2's Conv1D), from the base's weight now."""
        return self._delta(self._hidden(self._base_weight(base)))

    def merge(self, base: nn.Module, weight: Tensor) -> tuple[Tensor, Any]:
        """``weight + dW(weight)``; the state is ``H`` of that weight, so unmerge subtracts the same ``dW``."""
        h = self._hidden(weight)
        return weight + self._delta(h).to(weight.dtype), h

    def unmerge(self, base: nn.Module, weight: Tensor, state: Any) -> Tensor:
        h = self._hidden(self._base_weight(base)) if state is None else state
        return weight - self._delta(h).to(weight.dtype)
