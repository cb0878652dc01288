"""DeFT (decompositional efficient fine-tuning, NeurIPS 2025): projection + low-rank injection on Linear and
GPT-2 Conv1D, designed for text-to-image diffusion fine-tuning (a UNet's attention projections).

DeFT removes a learned rank-r subspace from the frozen weight ``W`` (d_out, d_in) and injects new content
into it:

    W' = (I - P_proj) W + s Q R,    P_proj = Q right^T

with the trained projection direction ``P`` (d_out, r) and injection ``R`` (r, d_in), ``s = alpha / r`` (1 when
``alpha`` is None). ``decomposition_method="relu"``: ``Q = P``, ``right = relu(P)`` (a non-orthogonal projector);
``"qr"``: ``Q = right`` the orthonormal factor of ``P``'s reduced QR (an orthogonal projector). ``para=True`` is
PaRa: ``W' = (I - P_proj) W``, no ``R``. ``W`` is frozen; ``P`` and ``R`` train. ``r`` is capped at d_out.
The update is additive and factors through rank r:

    dW = W' - W = Q (s R - M),    M = right^T W   (r, d_in)

``init_weights=True`` sets ``R = M / s`` (``P`` drawn N(0, 0.02^2) first), so ``dW = 0``: the model starts at
the base; False: ``R`` ~ N(0, (0.02 init_scale)^2), a subspace replaced from the start. The projections are
computed in float32, as in PEFT.

The forward never forms ``dW`` nor the d_out x d_out projector: ``x dW^T = (x (sR - M)^T) Q^T``, with ``M`` from
the layer's weight (one r x d_out x d_in product per call, independent of the batch). PEFT instead subtracts
``(x W^T) right Q^T`` from the base output; the two are equal (reassociated), and this form neither depends on
the running output nor keeps an extra d_out-wide product. Merging adds ``dW`` and keeps ``M`` (r x d_in, as PEFT's
cached merge factor) so unmerge subtracts the same ``dW``; the wrapper's record makes it bit-exact.

Files as PEFT 0.21: ``deft_P`` (d_out, r) and ``deft_R`` (r, d_in) per layer. Differences from PEFT: PEFT sets
``fan_in_fan_out`` in the config from the layer type (and warns); peftkit reads the layout from the layer and
leaves the config as given. With several DeFT adapters merged into one layer, each later one reads the weight
with the earlier ones merged (PEFT's merge of several adapters in one call reads the weight from before it).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ...kernel_helpers import CONV1D_TYPES, adapter_dtype, is_transposed, layer_dims
from ...layers import Adapter
from ...quant import dequantize_weight
from ...registry import register_method
from . import functional as DF
from .config import DeftConfig

_SUPPORTED = (nn.Linear,) + CONV1D_TYPES


@register_method(
    "deft",
    config=DeftConfig,
    category="reparameterized",
    modalities=("text", "vision", "vision-language", "generation"),
    mergeable=True,
    param_formula="r (d_out + d_in) per target (PaRa: r d_out), r <= d_out",
    position="weight delta Q (s R - right^T W) beside each targeted layer: a rank-r subspace of W replaced",
    paper="NeurIPS 2025 (DeFT); PaRa (arXiv 2410.08283) with para=True",
    examples={"deft": {"r": 4, "alpha": 8}},
)
class DeftAdapter(Adapter):
    supported_layers = _SUPPORTED
    default_roles = ("query", "value")  # PEFT's DeFT defaults are its LoRA defaults
    checkpoint_keys: ClassVar[dict[str, str]] = {"deft_P": "deft_P", "deft_R": "deft_R"}

    def __init__(self, base: nn.Module, config: DeftConfig, key: str = "", init: bool = True) -> None:
        super().__init__()
        if not isinstance(base, _SUPPORTED):
            raise TypeError(f"{key}: DeFT wraps Linear and GPT-2 Conv1D layers, not {type(base).__name__}")
        self.d_out, self.d_in = layer_dims(base)
        self.transposed = is_transposed(base)
        self.r = min(config.r, self.d_out)  # the projector's rank is at most d_out (as PEFT)
        self.method, self.para = config.decomposition_method, config.para
        self.scaling = config.alpha / self.r if config.alpha else 1.0
        w = base.weight
        dtype = adapter_dtype(base)  # fp32 on half-precision / quantized bases
        self.deft_P = nn.Parameter(torch.empty(self.d_out, self.r, device=w.device, dtype=dtype))
        if self.para:
            self.checkpoint_keys = {"deft_P": "deft_P"}
        else:
            self.deft_R = nn.Parameter(torch.empty(self.r, self.d_in, device=w.device, dtype=dtype))
        self.dropout = nn.Dropout(config.deft_dropout) if config.deft_dropout > 0 else nn.Identity()
        if init:
            with torch.no_grad():
                nn.init.normal_(self.deft_P, mean=0.0, std=0.02)
                if self.para or w.is_meta:
                    return
                if config.init_weights:  # R = right^T W / s: dW = 0 at the start
                    _, right = DF.project(self.deft_P, self.method)
                    self.deft_R.copy_(DF.removal_factor(right, self._logical(self._weight(base))) / self.scaling)
                else:
                    nn.init.normal_(self.deft_R, mean=0.0, std=0.02 * config.init_scale)

    @classmethod
    def param_count(cls, base: nn.Module, config: DeftConfig, key: str = "") -> int:
        """Closed form: ``P`` (d_out, r) and, unless PaRa, ``R`` (r, d_in), r capped at d_out."""
        d_out, d_in = layer_dims(base)
        r = min(config.r, d_out)
        return r * d_out + (0 if config.para else r * d_in)

    @staticmethod
    def _weight(base: nn.Module) -> Tensor:
        return base.weight if base.weight.is_floating_point() else dequantize_weight(base)

    def _logical(self, weight: Tensor) -> Tensor:
        """A weight in the base layer's layout as (d_out, d_in)."""
        return weight.t() if self.transposed else weight

    def _parts(self, weight: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(Q, M, sR)`` (float32) for a weight in the base layout (``sR`` None for PaRa)."""
        q, right = DF.project(self.deft_P, self.method)
        return q, DF.removal_factor(right, self._logical(weight)), self._injection()

    def _injection(self) -> Tensor | None:
        if self.para:
            return None
        r = self.deft_R.to(torch.float32)
        return r if self.scaling == 1.0 else r * self.scaling

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        q, m, rs = self._parts(self._weight(base))
        xf = x.to(torch.float32)
        y = DF.deft_apply(xf, self.dropout(xf), q, m, rs)
        return out.add_(y.to(out.dtype))  # ``out`` is ours to accumulate into (Adapter.forward)

    def _delta(self, q: Tensor, m: Tensor, rs: Tensor | None) -> Tensor:
        delta = DF.deft_delta(q, m, rs)
        return delta.t() if self.transposed else delta

    def delta_weight(self, base: nn.Module) -> Tensor:
        """``dW`` in the base weight's layout ((d_in, d_out) for GPT-2's Conv1D), float32."""
        return self._delta(*self._parts(self._weight(base)))

    def merge(self, base: nn.Module, weight: Tensor) -> tuple[Tensor, Any]:
        """``weight + dW(weight)``; the state is ``M = right^T W`` (r, d_in), so unmerge subtracts the same ``dW``."""
        q, m, rs = self._parts(weight)
        return weight + self._delta(q, m, rs).to(weight.dtype), m

    def unmerge(self, base: nn.Module, weight: Tensor, state: Any) -> Tensor:
        if state is None:
            return weight - self.delta_weight(base).to(weight.dtype)
        q, _ = DF.project(self.deft_P, self.method)
        return weight - self._delta(q, state, self._injection()).to(weight.dtype)
