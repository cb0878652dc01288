"""HRA (Yuan et al. 2024, arXiv 2405.17484): Householder reflection adaptation on Linear, GPT-2 Conv1D and Conv2d.

The pre-trained weight ``W`` (d_out, n) is multiplied on the right by an orthogonal chain of ``r``
Householder reflections, as the paper writes it:

    W' = W H,    H = prod_{i=1..r} (I - 2 u_i u_i^T / ||u_i||^2),    h = W' x + b

with ``u_i`` the columns of the trained ``hra_u`` (n, r); n is the layer's fan-in (``in_features``; a
convolution's kernel is flattened: n = c_in k_h k_w, ``W`` viewed as (c_out, c_in k_h k_w)). With
``apply_GS`` the vectors are orthonormalised first and ``H = I - 2 U U^T`` (the paper's HRA with an
orthogonality constraint). With an even ``r`` the default init repeats each of r/2 random vectors twice,
so the reflections cancel in pairs and the model starts at the base (PEFT's "symmetric" init; an odd r
starts from random reflections and warns).

File key ``hra_u`` (n, r), as Hugging Face PEFT, so adapter files load both ways; merging multiplies the
weight (``W H``) and unmerging multiplies by ``H^T`` (the reflections in reverse order), exactly as PEFT's
``get_delta_weight(reverse=True)``. Differences from PEFT (0.21): GPT-2's Conv1D is wrapped here (the chain
acts on the equivalent ``nn.Linear``'s weight, ``W`` stored transposed); PEFT's Conv2d reads only
``kernel_size[0]``, ``padding[0]`` and ``stride[0]`` (square kernels) and ignores dilation, while here the
whole kernel shape and the layer's own convolution parameters are used (identical on square, symmetric
convolutions); grouped convolutions are refused, as in PEFT. With ``apply_GS`` an ``r`` above the fan-in
cannot be orthonormalised and is refused when the adapter is built (PEFT produces NaN).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...kernel_helpers import CONV1D_TYPES, adapter_dtype, has_hooks, is_transposed, layer_dims
from ...layers import Adapter
from ...quant import dequantize_weight
from ...registry import register_method
from . import functional as HF
from .config import HRAConfig

_SUPPORTED = (nn.Linear, nn.Conv2d) + CONV1D_TYPES


def hra_geometry(base: nn.Module, key: str = "") -> tuple[str, int]:
    """(kind, n): "linear" / "conv" and the width the reflections act on; raises naming the layer otherwise."""
    if isinstance(base, nn.Conv2d):
        if base.groups != 1:
            raise ValueError(f"{key}: HRA does not wrap grouped convolutions (groups={base.groups}); "
                             "only groups=1 Conv2d layers")
        return "conv", base.in_channels * math.prod(base.kernel_size)
    if isinstance(base, (nn.Linear,) + CONV1D_TYPES):
        return "linear", layer_dims(base)[1]
    raise TypeError(f"{key}: HRA wraps Linear, GPT-2 Conv1D and Conv2d layers, not {type(base).__name__}")


@register_method(
    "hra",
    config=HRAConfig,
    category="reparameterized",
    modalities=("text", "vision", "vision-language", "generation"),
    mergeable=True,
    param_formula="n r per target (n: fan-in; c_in k_h k_w for a convolution)",
    position="orthogonal chain of r Householder reflections multiplying each targeted layer's weight (W H)",
    paper="arXiv 2405.17484 (HRA)",
    examples={"hra": {"r": 4}},
)
class HRAAdapter(Adapter):
    supported_layers = _SUPPORTED
    default_roles = ("query", "value")  # PEFT's HRA defaults are its LoRA defaults
    checkpoint_keys = {"hra_u": "hra_u"}

    def __init__(self, base: nn.Module, config: HRAConfig, key: str = "", init: bool = True) -> None:
        super().__init__()
        self.kind, self.n = hra_geometry(base, key)
        self.r = int(config.r)
        self.apply_gs = bool(config.apply_GS)
        if self.apply_gs and self.r > self.n:
            raise ValueError(
                f"{key}: HRAConfig.r={self.r} with apply_GS=True: Gram-Schmidt can orthonormalise at most the "
                f"layer's fan-in n={self.n} vectors; use r <= {self.n} (or apply_GS=False)"
            )
        self.transposed = is_transposed(base)
        w = base.weight
        dtype = adapter_dtype(base)  # fp32 on half-precision / quantized bases
        self.hra_u = nn.Parameter(torch.empty(self.n, self.r, device=w.device, dtype=dtype))  # (n, r)
        if init:
            with torch.no_grad():
                if config.init_weights and self.r % 2 == 0:
                    self.hra_u.copy_(HF.symmetric_init(self.n, self.r, dtype, w.device))
                else:
                    if config.init_weights:
                        warnings.warn(f"{key}: HRA's symmetric initialization needs an even r (got r={self.r}); "
                                      "the reflections start random", stacklevel=2)
                    nn.init.kaiming_uniform_(self.hra_u, a=math.sqrt(5))

    @classmethod
    def param_count(cls, base: nn.Module, config: HRAConfig, key: str = "") -> int:
        """Closed form: n r (n the fan-in: in_features, or c_in k_h k_w for a convolution)."""
        return hra_geometry(base, key)[1] * config.r

    # -- weights ---------------------------------------------------------------------------------------
    def householder(self, reverse: bool = False) -> Tensor:
        """``H`` (n, n); ``reverse``: ``H^-1`` (= ``H^T``)."""
        return HF.householder_product(self.hra_u, self.apply_gs, reverse)

    def _matrix(self, weight: Tensor) -> Tensor:
        """A base weight as (d_out, n) (a view)."""
        if self.kind == "conv":
            return weight.reshape(weight.shape[0], -1)
        return weight.t() if self.transposed else weight

    def _to_layout(self, matrix: Tensor, weight: Tensor) -> Tensor:
        if self.kind == "conv":
            return matrix.reshape(weight.shape)
        return (matrix.t() if self.transposed else matrix).contiguous()

    def _times(self, weight: Tensor, h: Tensor) -> Tensor:
        """``weight`` (base layout) times ``h`` on the fan-in side, in ``weight``'s layout and dtype."""
        return self._to_layout(self._matrix(weight).to(h.dtype) @ h, weight).to(weight.dtype)

    def _base_weight(self, base: nn.Module) -> Tensor:
        return base.weight if base.weight.is_floating_point() else dequantize_weight(base)

    # -- forward ---------------------------------------------------------------------------------------
    def fused_forward(self, base: nn.Module, x: Tensor) -> Tensor | None:
        """One product with the frozen ``W`` on the reflected inputs ``x H^T`` (compact WY form; PEFT forms
        ``W H`` and trains through it); convolutions: one product with ``W H``. The base output is never
        computed separately."""
        w = base.weight
        if has_hooks(base) or not w.is_floating_point() or torch.is_autocast_enabled(x.device.type):
            return None
        if self.kind == "conv":
            h = self.householder()
            merged = self._matrix(w).to(h.dtype) @ h  # (d_out, n)
            bias = None if base.bias is None else base.bias.to(h.dtype)
            return base._conv_forward(x.to(h.dtype), merged.view_as(w), bias).to(x.dtype)
        v, t = HF.compact_wy(self.hra_u, self.apply_gs)  # W H x = W (x + x H^T - x): the chain on the inputs
        xs = x.to(v.dtype)
        bias = None if base.bias is None else base.bias.to(v.dtype)
        return F.linear(xs + HF.reflect_rows_delta(xs, v, t), self._matrix(w).to(v.dtype), bias).to(x.dtype)

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        """The running output plus ``(W H - W) x`` (Linear: ``W (x H^T - x)``, the chain on the inputs)."""
        if self.kind != "conv":
            v, t = HF.compact_wy(self.hra_u, self.apply_gs)
            xs = x.to(v.dtype)
            y = F.linear(HF.reflect_rows_delta(xs, v, t), self._matrix(self._base_weight(base)).to(v.dtype))
            return out + y.to(out.dtype)
        h = self.householder()
        w = self._matrix(self._base_weight(base)).to(h.dtype)
        delta = w @ h - w
        if self.kind == "conv":
            y = base._conv_forward(x.to(h.dtype), delta.view_as(base.weight), None)
        else:
            y = F.linear(x.to(h.dtype), delta)
        return out + y.to(out.dtype)

    def forward_around(self, base: nn.Module, x: Tensor, inner: Any) -> Tensor:
        """Nested (peft's mixed model): ``W H x`` is the inner layers on ``H x``."""
        if self.kind == "conv":
            raise NotImplementedError("HRA: nesting other adapters inside the reflections is implemented for "
                                      "Linear layers only")
        h = self.householder()
        return inner(F.linear(x.to(h.dtype), h).to(x.dtype))

    # -- merge -----------------------------------------------------------------------------------------
    def merge(self, base: nn.Module, weight: Tensor) -> tuple[Tensor, Any]:
        """``W H`` in the base weight's layout."""
        return self._times(weight, self.householder()), None

    def unmerge(self, base: nn.Module, weight: Tensor, state: Any) -> Tensor:
        """``(W H) H^T`` (the reflections in reverse order, PEFT's unmerge)."""
        return self._times(weight, self.householder(reverse=True))
