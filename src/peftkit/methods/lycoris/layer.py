"""LoHa and LoKr adapters (the LyCORIS family) on Linear, GPT-2 Conv1D, Conv1d, Conv2d and Conv3d layers.

Both add a full-rank-capable weight delta ``dW`` built from few parameters, scaled by ``alpha / r``:

- LoHa (FedPara, Hyeon-Woo et al. 2022, arXiv 2108.06098): ``dW = (W1_a W1_b) * (W2_a W2_b)``
  (element-wise product of two rank-r matrices: rank up to r^2).
- LoKr (KronA / LyCORIS, arXiv 2212.10650, 2309.14859): ``dW = W1 (x) W2`` (Kronecker product), with
  ``W2 = W2_a W2_b`` (and optionally ``W1 = W1_a W1_b``) low rank when r is small.

Parameter names, shapes, initialisation, scaling and the training-time dropouts (``rank_dropout`` on
output rows of ``dW``, ``module_dropout`` skipping the adapter) follow Hugging Face PEFT, so adapter files
load both ways. Unlike PEFT, GPT-2's Conv1D (weight stored (d_in, d_out)) is supported: the parameters
are laid out as for the equivalent ``nn.Linear`` and the delta is transposed into the base layout. Nor
does PEFT (0.21) wrap Conv3d with LoHa / LoKr: here a Conv3d takes PEFT's Conv2d layout with a third kernel
axis, the layout LyCORIS itself uses (``w1_b`` (r, c_in / groups * k1 k2 k3), LoKr ``w2`` (b, d, k1, k2, k3),
effective-conv cores ``t`` (r, r, k1, k2, k3)).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...layers import Adapter
from ...kernel_helpers import CONV1D_TYPES, adapter_dtype, has_hooks, is_transposed, layer_dims
from ...targeting import LINEAR_TYPES
from ...registry import register_method
from ...targeting import pattern_value
from . import functional as YF
from .config import LoHaConfig, LoKrConfig

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_SUPPORTED = (nn.Linear, *_CONV) + CONV1D_TYPES
_MODALITIES = ("text", "vision", "vision-language", "generation")


def _geometry(base: nn.Module) -> tuple[int, int, tuple[int, ...], bool]:
    """(d_out, d_in per group, kernel, transposed) of a supported base layer."""
    if not isinstance(base, _SUPPORTED):
        raise TypeError(f"LyCORIS adapters wrap Linear, Conv1D and Conv1d/2d/3d layers, not {type(base).__name__}")
    d_out, d_in = layer_dims(base)
    if isinstance(base, _CONV):
        return d_out, d_in // base.groups, tuple(base.kernel_size), False
    return d_out, d_in, (), is_transposed(base)


class _LycorisAdapter(Adapter):
    """Shared mechanics: geometry, scaling, dropouts, forward through the delta weight, merge."""

    supported_layers = _SUPPORTED
    default_roles = ("query", "value")  # PEFT's LyCORIS defaults are its LoRA defaults
    rescale_rank_dropout: bool = True

    def __init__(self, base: nn.Module, config: Any, key: str = "", init: bool = True) -> None:
        super().__init__()
        self.d_out, self.d_in, self.kernel, self.transposed = _geometry(base)
        self.r = pattern_value(config.rank_pattern, key, config.r)
        self.alpha = pattern_value(config.alpha_pattern, key, config.alpha)
        self.scaling = self.alpha / self.r
        self.rank_dropout = float(config.rank_dropout)
        self.module_dropout = float(config.module_dropout)
        w = base.weight
        dtype = adapter_dtype(base)  # fp32 on half-precision / quantized bases
        for name, shape in self.shapes(config, key).items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape, device=w.device, dtype=dtype)))
        self._names = tuple(self.shapes(config, key))
        if init:
            with torch.no_grad():
                self._init_weights(config)

    # -- description -----------------------------------------------------------------------------------
    def shapes(self, config: Any, key: str) -> dict[str, tuple[int, ...]]:
        return self._shapes_from_geometry(self.d_out, self.d_in, self.kernel, self.r, config)

    @classmethod
    def _shapes_from_geometry(
        cls, d_out: int, d_in: int, kernel: tuple[int, ...], r: int, config: Any
    ) -> dict[str, tuple[int, ...]]:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def checkpoint_keys(self) -> dict[str, str]:  # type: ignore[override]
        return {name: name for name in self._names}

    @classmethod
    def param_count(cls, base: nn.Module, config: Any, key: str = "") -> int:
        """Closed form from the layer geometry (see ``functional.loha_shapes`` / ``lokr_shapes``)."""
        d_out, d_in, kernel, _ = _geometry(base)
        r = pattern_value(config.rank_pattern, key, config.r)
        return sum(math.prod(s) for s in cls._shapes_from_geometry(d_out, d_in, kernel, r, config).values())

    # -- weights ---------------------------------------------------------------------------------------
    def _raw_delta(self) -> Tensor:  # pragma: no cover - abstract
        """``dW`` (scaled) in any layout that reshapes to (d_out, d_in, *kernel)."""
        raise NotImplementedError

    def _natural_delta(self) -> Tensor:
        return self._raw_delta().reshape(self.d_out, self.d_in, *self.kernel)

    def delta_weight(self, base: nn.Module) -> Tensor:
        """``dW`` in the base weight's layout ((d_in, d_out) for GPT-2's Conv1D)."""
        delta = self._natural_delta()
        return delta.t() if self.transposed else delta

    # -- forward ---------------------------------------------------------------------------------------
    def _skip(self) -> bool:
        """module_dropout: in training, skip the adapter with that probability (PEFT's rule)."""
        return self.training and self.module_dropout > 0 and not bool(torch.rand(1) > self.module_dropout)

    def _row_mask(self, like: Tensor) -> Tensor | None:
        if self.training and self.rank_dropout > 0:
            return YF.row_dropout_mask(self.d_out, self.rank_dropout, self.rescale_rank_dropout, like)
        return None

    def fused_forward(self, base: nn.Module, x: Tensor) -> Tensor | None:
        """A plain Linear / GPT-2 Conv1D base: one GEMM with ``W0 + dW`` (see ``_merged_weight``).

        The delta is a dense (d_out, d_in) matrix either way (PEFT forms it too), so merging it costs
        d_out d_in adds and saves a GEMM forward and one backward, and the (tokens x d_out) temporaries of a
        separate delta product and the sum. Declines (the generic path) for conv layers, hooks, autocast,
        mixed dtypes and an active module dropout (which the generic path draws)."""
        if self.kernel or type(base) not in LINEAR_TYPES or has_hooks(base):
            return None
        w = base.weight
        if x.dtype != w.dtype or getattr(self, self._names[0]).dtype != w.dtype:
            return None
        if torch.is_autocast_enabled(x.device.type) or (self.training and self.module_dropout > 0):
            return None
        x2d = x.reshape(-1, x.shape[-1])
        out = F.linear(x2d, self._merged_weight(w.t() if self.transposed else w), base.bias)
        return out.view(*x.shape[:-1], out.shape[-1])

    def _merged_weight(self, w: Tensor) -> Tensor:
        """``W0 + dW`` as (d_out, d_in), ``w`` the base weight in that layout; rank dropout applied to ``dW``."""
        delta = self._natural_delta()
        mask = self._row_mask(delta)
        if mask is not None:
            delta = delta * mask.view(-1, 1)
        return w + delta

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        if self._skip():
            return out
        delta = self._natural_delta()
        mask = self._row_mask(delta)
        if mask is not None:
            delta = delta * mask.view(-1, *([1] * (delta.dim() - 1)))
        if x.dtype != delta.dtype:
            x = x.to(delta.dtype)
        if self.kernel:
            y = _CONV_FN[len(self.kernel)](x, delta, None, base.stride, base.padding, base.dilation, base.groups)
        else:
            y = F.linear(x, delta)
        return out + y.to(out.dtype)


@register_method(
    "loha",
    config=LoHaConfig,
    category="reparameterized",
    modalities=_MODALITIES,
    mergeable=True,
    param_formula="2 r (d_in + d_out) per target (conv: 2 r (c_in k^2 + c_out); effective conv: 2 r (c_in + c_out + r k^2))",
    position="weight delta beside each targeted layer",
    paper="arXiv 2108.06098 (FedPara / LoHa), 2309.14859 (LyCORIS)",
    examples={"loha": {"r": 4, "alpha": 4}},
)
class LoHaAdapter(_LycorisAdapter):
    """``dW = ((W1_a W1_b) * (W2_a W2_b)) alpha / r``; effective conv: CP-factored kernels ``t1``, ``t2``."""

    hada_w1_a: nn.Parameter
    hada_w1_b: nn.Parameter
    hada_w2_a: nn.Parameter
    hada_w2_b: nn.Parameter

    @classmethod
    def _shapes_from_geometry(cls, d_out, d_in, kernel, r, config):  # type: ignore[override]
        return YF.loha_shapes(d_out, d_in, kernel, r, config.use_effective_conv2d)

    @property
    def cp(self) -> bool:
        return "hada_t1" in self._names

    def _init_weights(self, config: LoHaConfig) -> None:
        # PEFT: Kaiming-uniform factors; with init_weights W2_b is zero, so dW starts at zero
        for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"):
            if name not in self._names:
                continue
            p = getattr(self, name)
            if name == "hada_w2_b" and config.init_weights:
                nn.init.zeros_(p)
            else:
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))

    def _raw_delta(self) -> Tensor:
        if self.cp:
            return YF.hadamard_delta_cp(
                self.hada_t1, self.hada_w1_a, self.hada_w1_b, self.hada_t2, self.hada_w2_a, self.hada_w2_b,
                self.scaling,
            )
        return YF.hadamard_delta(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, self.scaling)

    def _merged_weight(self, w: Tensor) -> Tensor:
        if self.cp or (self.training and self.rank_dropout > 0):
            return super()._merged_weight(w)
        # W0 added into the product's buffer: one (d_out, d_in) allocation fewer
        return YF.hadamard_delta(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, self.scaling, w)


@register_method(
    "lokr",
    config=LoKrConfig,
    category="reparameterized",
    modalities=_MODALITIES,
    mergeable=True,
    param_formula="a c + b d (d_out = a b, d_in = c d), or a c + r (b + d) with W2 low rank, per target",
    position="weight delta beside each targeted layer",
    paper="arXiv 2212.10650 (KronA), 2309.14859 (LyCORIS / LoKr)",
    examples={"lokr": {"r": 4, "alpha": 4}},
)
class LoKrAdapter(_LycorisAdapter):
    """``dW = (W1 (x) W2) alpha / r`` with ``W1`` (a, c), ``W2`` (b, d[, *kernel]), d_out = a b, d_in = c d."""

    def __init__(self, base: nn.Module, config: LoKrConfig, key: str = "", init: bool = True) -> None:
        super().__init__(base, config, key, init)
        self.rescale_rank_dropout = bool(config.rank_dropout_scale)

    @classmethod
    def _shapes_from_geometry(cls, d_out, d_in, kernel, r, config):  # type: ignore[override]
        return YF.lokr_shapes(
            d_out, d_in, kernel, r, config.decompose_both, config.decompose_factor, config.use_effective_conv2d
        )

    def _init_weights(self, config: LoKrConfig) -> None:
        # PEFT: True zeroes W1 (or W1_a); "lycoris" zeroes W2 (or W2_b); False keeps every factor random
        mode = config.init_weights
        zero = set()
        if mode is True:
            zero = {"lokr_w1", "lokr_w1_a"}
        elif mode == "lycoris":
            zero = {"lokr_w2", "lokr_w2_b"}
        for name in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"):
            if name not in self._names:
                continue
            p = getattr(self, name)
            nn.init.zeros_(p) if name in zero else nn.init.kaiming_uniform_(p, a=math.sqrt(5))

    def _factors(self) -> tuple[Tensor, Tensor]:
        names = self._names
        w1 = self.lokr_w1 if "lokr_w1" in names else self.lokr_w1_a @ self.lokr_w1_b
        if "lokr_w2" in names:
            w2 = self.lokr_w2
        elif "lokr_t2" in names:
            w2 = YF.cp_rebuild(self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b)
        else:
            w2 = self.lokr_w2_a @ self.lokr_w2_b
        return w1, w2

    def _raw_delta(self) -> Tensor:
        w1, w2 = self._factors()
        return YF.kron_delta(w1, w2, self.scaling)

    def fused_forward(self, base: nn.Module, x: Tensor) -> Tensor | None:
        """As the other LyCORIS methods above the break-even token count ``d_in d_out / (d_in + d_out)``;
        below it (e.g. decoding) forming the Kronecker product costs more than ``kron_matvec`` does."""
        if self.kernel or x.numel() // x.shape[-1] * (self.d_in + self.d_out) < self.d_in * self.d_out:
            return None
        return super().fused_forward(base, x)

    def _merged_weight(self, w: Tensor) -> Tensor:
        if self.training and self.rank_dropout > 0:
            return super()._merged_weight(w)
        w1, w2 = self._factors()
        return torch.add(w, torch.kron(w1, w2), alpha=self.scaling)  # the scaling fused into the add

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        if self.kernel:
            return super().forward(base, x, out)
        # linear: (W1 (x) W2) x = vec(W1 X W2^T), never forming the (d_out, d_in) product
        if self._skip():
            return out
        w1, w2 = self._factors()
        if x.dtype != w1.dtype:
            x = x.to(w1.dtype)
        y = YF.kron_matvec(x, w1, w2) * self.scaling
        mask = self._row_mask(y)
        if mask is not None:
            y = y * mask
        return out + y.to(out.dtype)
