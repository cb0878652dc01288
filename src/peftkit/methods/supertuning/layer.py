"""Super-Tuning (arXiv 2607.09287) on Linear and GPT-2 Conv1D layers: a sparse, magnitude-selected support of
trainable weight entries ("Super"), optionally plus a LoRA pair ("Supra").

The frozen weight ``W0`` (d_out, d_in) gets a sparse update on a support ``Ω`` of ``k`` entries chosen once,
before training, by magnitude (no data, no calibration pass), and optionally a low-rank one:

    W = W0 + S + (alpha / r) B A,     S_ij = v_m if (i, j) = Ω_m else 0,
    Ω = top-k |W0_ij| (select_top) or bottom-k,      k = int(d_out d_in (1 - sparsity))

Tensors and file keys (Hugging Face PEFT 0.21's): ``supertuning_values`` (k,) the trained entries,
``supertuning_indices`` (k,) int32, flat row-major positions into ``W0`` (a buffer, saved only when
``save_precomputed_indices``; otherwise recomputed on load from the base weights), and with ``r``
``supertuning_lora_A.weight`` (r, d_in), ``supertuning_lora_B.weight`` (d_out, r). The forward is one
product with ``W0 + S`` (scattered into a copy of ``W0`` per call, as PEFT; on CPU this is faster than
gathering the k input columns and scattering into the k output rows per token, the path kept for wrapped or
hooked bases) plus the LoRA branch, ``B A dropout(x)`` scaled by ``alpha / r``. The merge adds
``S + (alpha / r) B A`` (a delta weight; unmerge is bit-exact through the wrapper).

Where PEFT differs from the paper, peftkit follows PEFT: only magnitude scoring (the paper also scores by
Wanda-style activation-weighted magnitude), ``init_weights=False`` draws the values standard normal (PEFT's
test init, not the documented Kaiming). Beyond PEFT, GPT-2's Conv1D is supported (PEFT wraps ``nn.Linear``
only): the support and LoRA pair are laid out as for the equivalent Linear (positions into ``W0^T`` of the
stored (d_in, d_out) weight), so a Conv1D adapter's file equals the linearized model's.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import ConfigError
from ...kernel_helpers import adapter_dtype, has_hooks, is_transposed, layer_dims
from ...layers import Adapter
from ...registry import register_method
from ...targeting import LINEAR_TYPES
from . import functional as SF
from .config import SupertuningConfig


def _support_size(d_out: int, d_in: int, config: SupertuningConfig, key: str) -> int:
    """k for a (d_out, d_in) weight; a sparsity that leaves nothing to train is refused, naming the module."""
    k = SF.num_trainable(d_out * d_in, config.sparsity)
    if k < 1:
        raise ConfigError(
            f"SupertuningConfig.sparsity: {config.sparsity} leaves no trainable entry of the {d_out} x {d_in} weight "
            f"of {key or 'the layer'}; expected a sparsity in [0, {1 - 1 / (d_out * d_in):.6g}] for this layer "
            f"(k = int(numel (1 - sparsity)) >= 1)"
        )
    return k


@register_method(
    "supertuning",
    config=SupertuningConfig,
    category="hybrid",
    modalities=("text", "vision", "vision-language", "generation"),
    mergeable=True,
    param_formula="int(d_in d_out (1 - sparsity)) (+ r (d_in + d_out) with r) per target",
    position="sparse entries of each targeted weight, selected by magnitude, plus an optional LoRA pair",
    paper="arXiv 2607.09287 (Super-Tuning)",
    examples={"supertuning": {"sparsity": 0.9, "r": 2}},
)
class SupertuningAdapter(Adapter):
    supported_layers = LINEAR_TYPES
    default_roles = ("query", "value")  # PEFT's Super-Tuning defaults are its LoRA defaults

    def __init__(self, base: nn.Module, config: SupertuningConfig, key: str = "", init: bool = True) -> None:
        super().__init__()
        self.d_out, self.d_in = layer_dims(base)
        self.transposed = is_transposed(base)
        k = _support_size(self.d_out, self.d_in, config, key)
        self.save_indices = bool(config.save_precomputed_indices)
        w = base.weight
        dtype = adapter_dtype(base)  # fp32 on half-precision / quantized bases
        w0 = w.detach().t() if self.transposed else w.detach()
        # computed from the base even when loading: a file without indices relies on it (PEFT's rule)
        self.register_buffer("supertuning_indices", SF.select_support(w0, k, config.select_top))
        self.supertuning_values = nn.Parameter(torch.zeros(k, device=w.device, dtype=dtype))
        self.r = config.r or 0
        if self.r:
            self.scaling = float(config.lora_alpha) / self.r
            self.supertuning_lora_A = nn.Parameter(torch.zeros(self.r, self.d_in, device=w.device, dtype=dtype))
            self.supertuning_lora_B = nn.Parameter(torch.zeros(self.d_out, self.r, device=w.device, dtype=dtype))
            self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        if init:
            with torch.no_grad():
                self._init_weights(config.init_weights)

    def _init_weights(self, init_weights: bool) -> None:
        """PEFT's: values zero (standard normal with init_weights=False), ``A`` Kaiming uniform, ``B`` zero
        (Kaiming uniform with init_weights=False)."""
        if not init_weights:
            self.supertuning_values.copy_(torch.randn(self.supertuning_values.shape))
        if self.r:
            nn.init.kaiming_uniform_(self.supertuning_lora_A, a=math.sqrt(5))
            if init_weights:
                nn.init.zeros_(self.supertuning_lora_B)
            else:
                nn.init.kaiming_uniform_(self.supertuning_lora_B, a=math.sqrt(5))

    @property
    def checkpoint_keys(self) -> dict[str, str]:  # type: ignore[override]
        keys = {"supertuning_values": "supertuning_values"}
        if self.save_indices:
            keys["supertuning_indices"] = "supertuning_indices"
        if self.r:
            keys.update(supertuning_lora_A="supertuning_lora_A.weight", supertuning_lora_B="supertuning_lora_B.weight")
        return keys

    @classmethod
    def param_count(cls, base: nn.Module, config: SupertuningConfig, key: str = "") -> int:
        """Closed form: k = int(d_out d_in (1 - sparsity)) values, plus r (d_in + d_out) with a LoRA pair."""
        d_out, d_in = layer_dims(base)
        return _support_size(d_out, d_in, config, key) + (config.r or 0) * (d_in + d_out)

    @classmethod
    def check_new_adapter(cls, configs: dict[str, Any], config: SupertuningConfig, adapter_name: str) -> None:
        """As PEFT: the indices are saved for every Super-Tuning adapter of a model or for none."""
        for name, other in configs.items():
            if isinstance(other, SupertuningConfig) and other.save_precomputed_indices != config.save_precomputed_indices:
                raise ConfigError(
                    f"SupertuningConfig.save_precomputed_indices: {config.save_precomputed_indices} differs from "
                    f"adapter {name!r}'s {other.save_precomputed_indices}; the indices are saved for all Super-Tuning "
                    "adapters of a model or for none (as in PEFT)"
                )

    # -- forward and merge ------------------------------------------------------------------------------
    def fused_forward(self, base: nn.Module, x: Tensor) -> Tensor | None:
        """One product with ``W0 + S`` (PEFT's forward; on CPU the index gathers and scatters of ``forward`` over
        every token cost several times this one GEMM), plus the LoRA branch: a plain Linear / Conv1D base whose
        weight has the adapter's dtype, no hooks, no autocast."""
        w, values = base.weight, self.supertuning_values
        if type(base) not in LINEAR_TYPES or has_hooks(base) or w.dtype != values.dtype:
            return None
        if x.dtype != w.dtype or torch.is_autocast_enabled(x.device.type):
            return None
        weight = SF.compose(w.t() if self.transposed else w, values, self.supertuning_indices)
        y = F.linear(x, weight, base.bias)
        if self.r:
            a, b = self.supertuning_lora_A, self.supertuning_lora_B
            y = y + F.linear(F.linear(self.dropout(x), a), b) * self.scaling
        return y

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        values = self.supertuning_values
        xs = x.to(values.dtype)
        y = SF.sparse_matvec(xs, values, self.supertuning_indices, self.d_in, self.d_out)
        if self.r:
            a, b = self.supertuning_lora_A, self.supertuning_lora_B
            y = y + F.linear(F.linear(self.dropout(xs), a), b) * self.scaling
        return out + y.to(out.dtype)

    def delta_weight(self, base: nn.Module) -> Tensor:
        """``S + (alpha / r) B A`` in the base weight's layout ((d_in, d_out) for Conv1D)."""
        delta = SF.sparse_delta(self.supertuning_values, self.supertuning_indices, (self.d_out, self.d_in))
        if self.r:
            delta = delta + SF.lora_delta(self.supertuning_lora_A, self.supertuning_lora_B, self.scaling)
        return delta.t() if self.transposed else delta
