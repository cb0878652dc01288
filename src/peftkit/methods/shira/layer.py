"""SHiRA (Bhardwaj et al., "Sparse High Rank Adapters", arXiv 2406.13175) on Linear and GPT-2 Conv1D layers.

The paper trains a sparse subset of each targeted weight ``W`` (d_out, d_in) directly, through a fixed
binary mask ``M`` chosen before training:

    W = W0 + S,   S = M * S,   h = (W0 + S) x

``S`` holds ``K = r (d_in + d_out)`` trainable entries (LoRA's count at rank r; the update itself is of high
rank). Here, as in PEFT (0.21), whose files and numbers this follows, ``S`` is stored as ``shira_weight`` (K,)
values at ``shira_indices`` (2, K) int32 (row, column) positions, both in the adapter file; the mask is random
(``random_mask``: a CPU generator's permutation, the paper's SHiRA-Rand) unless the config carries another
``mask_fn``. The forward is PEFT's: one product with ``W0 + S`` (and the base bias). Values start at zero.

Differences from PEFT: PEFT wraps only ``nn.Linear``; GPT-2's Conv1D is wrapped here too, the mask and indices
laid out for the equivalent Linear (d_out, d_in). A rank whose K exceeds a layer's d_in d_out, and a mask
with another number of ones than K, fail at ``get_peft_model`` with a ``ConfigError`` naming the module,
before the model changes. ``scaling`` (1.0, PEFT's inference-time ``set_scale``) multiplies the values.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import ConfigError
from ...kernel_helpers import adapter_dtype, has_hooks, is_transposed, layer_dims
from ...layers import Adapter
from ...registry import register_method
from ...targeting import LINEAR_TYPES
from . import functional as SF
from .config import ShiraConfig


def _count(base: nn.Module, config: ShiraConfig, key: str) -> int:
    """K = r (d_in + d_out); a ConfigError naming the module when it exceeds the layer's entries."""
    d_out, d_in = layer_dims(base)
    k = config.r * (d_in + d_out)
    if k > d_in * d_out:
        raise ConfigError(f"{key or type(base).__name__}: ShiraConfig.r={config.r} asks for r (d_in + d_out) = {k} "
                          f"trainable entries of a {d_out} x {d_in} weight ({d_out * d_in} entries); expected "
                          f"1 <= r <= {d_in * d_out // (d_in + d_out)}")
    return k


@register_method(
    "shira",
    config=ShiraConfig,
    category="reparameterized",
    modalities=("text", "vision", "vision-language", "generation"),
    mergeable=True,
    param_formula="r (d_in + d_out) entries of each targeted weight",
    position="sparse trainable subset of each targeted layer's weight (fixed mask)",
    paper="arXiv 2406.13175 (SHiRA)",
    examples={"shira": {"r": 2, "random_seed": 3}},
)
class ShiraAdapter(Adapter):
    supported_layers = LINEAR_TYPES
    # PEFT's SHiRA defaults are LoRA's, but query and value only on phi (where LoRA adds fc1 / fc2)
    default_roles = {"phi": ("query", "value"), "*": ("query", "value")}
    checkpoint_keys: ClassVar[dict[str, str]] = {"shira_weight": "shira_weight", "shira_indices": "shira_indices"}

    def __init__(self, base: nn.Module, config: ShiraConfig, key: str = "", init: bool = True) -> None:
        super().__init__()
        self.d_out, self.d_in = layer_dims(base)
        self.transposed = is_transposed(base)
        self.scaling = 1.0
        k = _count(base, config, key)
        device = base.weight.device
        dtype = adapter_dtype(base)  # fp32 on half-precision / quantized bases
        if init:
            indices = self._mask_indices(base, config, key, k).to(device)
        else:  # loading: the file holds the indices
            indices = torch.zeros(2, k, dtype=torch.int32, device=device)
        self.register_buffer("shira_indices", indices)
        values = torch.zeros(k) if not init or config.init_weights else torch.randn(k)
        self.shira_weight = nn.Parameter(values.to(device=device, dtype=dtype))

    @staticmethod
    def _mask_indices(base: nn.Module, config: ShiraConfig, key: str, k: int) -> Tensor:
        where = key or type(base).__name__
        mask_fn = getattr(config, "mask_fn", None)
        if mask_fn is None:
            raise ConfigError(f"ShiraConfig.mask_type: {config.mask_type!r} has no mask function; expected 'random' "
                              "or config.mask_fn set to fn(base_layer, r, **kwargs) returning a (d_out, d_in) mask")
        kwargs: dict[str, Any] = {"bias": getattr(base, "bias", None) is not None}
        if config.mask_type == "random":
            kwargs["random_seed"] = config.random_seed
        mask = mask_fn(base, config.r, **kwargs)
        if tuple(mask.shape) != (layer_dims(base)):
            raise ConfigError(f"{where}: ShiraConfig.mask_fn returned a mask of shape {tuple(mask.shape)}; expected "
                              f"{layer_dims(base)} (d_out, d_in)")
        if mask.is_meta:  # a base built on the meta device: no mask content, only the indices' shape
            return torch.empty(2, k, dtype=torch.int32, device="meta")
        indices = SF.mask_indices(mask)
        if indices.shape[1] != k:
            raise ConfigError(f"{where}: ShiraConfig.mask_fn returned {indices.shape[1]} ones; expected exactly "
                              f"r (d_in + d_out) = {k}")
        return indices

    @classmethod
    def param_count(cls, base: nn.Module, config: ShiraConfig, key: str = "") -> int:
        """Closed form: r (d_in + d_out) per target (the indices are a frozen buffer)."""
        return _count(base, config, key)

    # -- weights ---------------------------------------------------------------------------------------
    def _delta(self) -> Tensor:
        """``S`` (d_out, d_in)."""
        return SF.sparse_delta(self.shira_indices, self.shira_weight, (self.d_out, self.d_in), self.scaling)

    def delta_weight(self, base: nn.Module) -> Tensor:
        """``S`` in the base weight's layout ((d_in, d_out) for Conv1D)."""
        delta = self._delta()
        return delta.t() if self.transposed else delta

    # -- forward ---------------------------------------------------------------------------------------
    def fused_forward(self, base: nn.Module, x: Tensor) -> Tensor | None:
        """PEFT's forward: one product with ``W0 + S`` and the base bias (a plain Linear / Conv1D base whose
        weight has the adapter's dtype, no hooks)."""
        w = base.weight
        if type(base) not in LINEAR_TYPES or has_hooks(base) or w.dtype != self.shira_weight.dtype:
            return None
        if x.dtype != w.dtype or torch.is_autocast_enabled(x.device.type):
            return None
        weight = (w.t() if self.transposed else w) + self._delta()
        return F.linear(x, weight, base.bias)

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        delta = self._delta()
        return out + F.linear(x.to(delta.dtype), delta).to(out.dtype)
