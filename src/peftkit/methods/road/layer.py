"""RoAd (Liao et al. 2024, arXiv 2409.00119): 2D rotary adaptation of a layer's output, on Linear and GPT-2 Conv1D.

The output ``h = W x + b`` (d_out,) of a frozen layer is split into pairs of elements and each pair is rotated
and scaled by its own 2x2 matrix (the paper's eq. 4):

    z = R h,    R = blockdiag(R_1, ..., R_{d_out/2}),    R_i = [[a_i cos t_i, -a_i sin t_i],
                                                                [a_i sin t_i,  a_i cos t_i]]

Only the angles ``t`` and scales ``a`` train (``road_theta``, ``road_alpha``); ``W`` and ``b`` stay frozen.
Starting at ``t = 0``, ``a = 1`` makes ``R`` the identity (the model starts at the base). Pairing (as Hugging Face
PEFT, which the paper's authors did not write): the output is split into groups of ``group_size`` and element
``i`` of a group is paired with element ``i + group_size / 2``. Variants: ``road_1`` one angle and scale per pair
(d_out / 2 each), ``road_2`` one per element (d_out each: the two rows of ``R_i`` get their own), ``road_4`` two
per element (2 d_out each: the diagonal and the off-diagonal of each row get their own angle and scale, so
``R_i`` is a general 2x2 matrix ``[[a1 cos t1, -a2' sin t2'], [a2 sin t2, a1' cos t1']]``).

Forward: ``R h`` element-wise (``functional.rotate``), never a d_out x d_out matrix; in training autograd keeps
``h`` only (PEFT's formula also keeps its rotated copy). Mixed-adapter batches (``adapter_names``): every
adapter's two diagonals stacked once, gathered per row, one element-wise pass (``batched_forward``): about the
cost of a single adapter. Merge: ``R (W x + b) = (R W) x + R b``, so ``W <- R W`` and ``b <- R b`` (PEFT's merge,
computed on the pairs of rows rather than as a dense product); unmerge applies ``R^-1`` (closed-form 2x2
inverses) and the wrapper's exact-restore record makes it bit-exact. File keys ``road_theta`` / ``road_alpha``
as PEFT. Unlike PEFT (0.21), GPT-2's Conv1D is wrapped too (its output is laid out as Linear's; the merge
rotates the weight's columns).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from ...config import ConfigError
from ...kernel_helpers import CONV1D_TYPES, adapter_dtype, is_transposed, layer_dims
from ...layers import Adapter
from ...registry import register_method
from ...routing import cached_stack
from . import functional as RF
from .config import RoadConfig

_SUPPORTED = (nn.Linear,) + CONV1D_TYPES


def _check_group_size(key: str, d_out: int, group_size: int) -> None:
    if d_out % group_size:
        allowed = [g for g in range(2, d_out + 1, 2) if d_out % g == 0]
        raise ConfigError(
            f"{key or 'layer'}: RoadConfig.group_size={group_size} must divide the layer's output width "
            f"({d_out}); allowed group_size values for this layer: {allowed}"
        )


@register_method(
    "road",
    config=RoadConfig,
    category="reparameterized",
    modalities=("text", "vision", "vision-language", "generation"),
    mergeable=True,
    param_formula="d_out (road_1), 2 d_out (road_2) or 4 d_out (road_4) per target",
    position="2x2 rotations with scales of pairs of each targeted layer's outputs",
    paper="arXiv 2409.00119 (RoAd)",
    examples={"road": {"group_size": 8, "variant": "road_2"}},
)
class RoadAdapter(Adapter):
    supported_layers = _SUPPORTED
    default_roles = ("query", "value")  # PEFT's RoAd defaults are its LoRA defaults
    checkpoint_keys: ClassVar[dict[str, str]] = {"road_theta": "road_theta", "road_alpha": "road_alpha"}
    merged_params: ClassVar[tuple[str, ...]] = ("weight", "bias")

    def __init__(self, base: nn.Module, config: RoadConfig, key: str = "", init: bool = True) -> None:
        super().__init__()
        if not isinstance(base, _SUPPORTED):
            raise TypeError(f"{key}: RoAd wraps Linear and GPT-2 Conv1D layers, not {type(base).__name__}")
        self.d_out, self.d_in = layer_dims(base)
        _check_group_size(key, self.d_out, config.group_size)
        self.variant, self.group_size = config.variant, config.group_size
        self.transposed = is_transposed(base)
        size = RF.param_size(self.variant, self.d_out)
        w = base.weight
        dtype = adapter_dtype(base)  # fp32 on half-precision / quantized bases
        self.road_theta = nn.Parameter(torch.zeros(size, device=w.device, dtype=dtype))
        self.road_alpha = nn.Parameter(torch.ones(size, device=w.device, dtype=dtype))
        if init and not config.init_weights:
            with torch.no_grad():
                nn.init.normal_(self.road_theta, mean=0.0, std=0.5)
                nn.init.normal_(self.road_alpha, mean=1.0, std=0.5)

    @classmethod
    def param_count(cls, base: nn.Module, config: RoadConfig, key: str = "") -> int:
        """Closed form: angles and scales, d_out / 2, d_out or 2 d_out of each (road_1 / road_2 / road_4)."""
        d_out, _ = layer_dims(base)
        return 2 * RF.param_size(config.variant, d_out)

    def cols(self) -> tuple[Tensor, Tensor]:
        """The rotation's diagonal and off-diagonal, (d_out,) each (PEFT's ``_prepare_cols``)."""
        return RF.road_cols(self.variant, self.group_size, self.road_theta, self.road_alpha)

    def kernel_cols(self) -> tuple[Tensor, Tensor]:
        """``(first, q)`` for ``functional.rotate``; cached while the angles and scales do not change and autograd
        does not record them (inference), built afresh otherwise."""
        def build() -> tuple[Tensor, Tensor]:
            first, second = self.cols()
            return first, RF.signed(second, self.group_size)

        cache = self.__dict__.setdefault("_cols_cache", {})
        return cached_stack(cache, "road", [self.road_theta, self.road_alpha], build)

    # -- forward ---------------------------------------------------------------------------------------
    @staticmethod
    def _rotate_out(out: Tensor, first: Tensor, q: Tensor, group_size: int) -> Tensor:
        h = out if out.dtype == first.dtype else out.to(first.dtype)
        return RF.rotate(h, first, q, group_size).to(out.dtype)

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        first, q = self.kernel_cols()
        return self._rotate_out(out, first, q, self.group_size)

    @classmethod
    def batched_forward(
        cls, adapters: list["RoadAdapter"], base: nn.Module, x: Tensor, out: Tensor, index: Tensor, cache: dict
    ) -> Tensor | None:
        """Mixed batch: the adapters' diagonals stacked (n + 1, d_out), with an identity slot (1, 0) for rows
        without an adapter here, gathered per row; then one element-wise rotation of the whole batch."""
        first = adapters[0]
        if cls.forward is not RoadAdapter.forward:
            return None
        dtype = first.road_theta.dtype
        if any(a.group_size != first.group_size or a.road_theta.dtype != dtype for a in adapters):
            return None
        params = [t for a in adapters for t in (a.road_theta, a.road_alpha)]

        def build() -> tuple[Tensor, Tensor]:
            cols = [a.kernel_cols() for a in adapters]
            ident = cols[0][0].new_ones(1, first.d_out), cols[0][0].new_zeros(1, first.d_out)
            return (torch.cat([c[0].reshape(1, -1) for c in cols] + [ident[0]]),
                    torch.cat([c[1].reshape(1, -1) for c in cols] + [ident[1]]))

        f, q = cached_stack(cache, "road", params, build, extra=tuple(a.variant for a in adapters))
        shape = (out.shape[0],) + (1,) * (out.dim() - 2) + (first.d_out,)
        return cls._rotate_out(out, f.index_select(0, index).view(shape), q.index_select(0, index).view(shape),
                               first.group_size)

    # -- merge -----------------------------------------------------------------------------------------
    def _merge_with(self, value: Tensor, cols: tuple[Tensor, Tensor], out_axis: int) -> Tensor:
        """``R value`` along ``out_axis`` for ``cols = (first, second)``, in the wider of the two dtypes."""
        dtype = torch.promote_types(value.dtype, cols[0].dtype)
        first, q = cols[0].to(dtype), RF.signed(cols[1], self.group_size).to(dtype)
        return RF.rotate_weight(value.to(dtype), first, q, self.group_size, out_axis).to(value.dtype)

    def _out_axis(self, value: Tensor) -> int:
        return value.dim() - 1 if self.transposed else 0

    def merge(self, base: nn.Module, weight: Tensor) -> tuple[Tensor, None]:
        """``R W`` (the output axis of the weight rotated)."""
        return self._merge_with(weight, self.cols(), self._out_axis(weight)), None

    def unmerge(self, base: nn.Module, weight: Tensor, state: None) -> Tensor:
        return self._merge_with(weight, RF.inverse_cols(*self.cols(), self.group_size), self._out_axis(weight))

    def merge_param(self, base: nn.Module, name: str, value: Tensor) -> Tensor:
        """``R b``."""
        return self._merge_with(value, self.cols(), 0)

    def unmerge_param(self, base: nn.Module, name: str, value: Tensor) -> Tensor:
        return self._merge_with(value, RF.inverse_cols(*self.cols(), self.group_size), 0)
