"""(IA)3 (Liu et al. 2022, T-Few, arXiv 2205.05638): learned vectors that rescale activations.

For a non-feedforward target (attention keys and values) the layer output is rescaled,
``y = l * (W x + b)``; for a feedforward target (the FFN output projection) its input is,
``y = W (l * x) + b``. ``l`` starts at 1, so the model starts at the base. Merging is multiplicative:
rows of ``W`` and the bias (output scaling) or columns of ``W`` (input scaling), as in PEFT.

Parameter shapes and the checkpoint key ``ia3_l`` follow Hugging Face PEFT: (d_out, 1) for output
scaling, (1, d_in) for input scaling; Conv2d (1, c, 1, 1), Conv3d (1, c, 1, 1, 1).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ConfigError, PeftConfig
from ..layers import Adapter
from ..kernel_helpers import adapter_dtype, is_transposed, layer_dims
from ..registry import register_method
from ..routing import cached_stack, row_view
from ..targeting import LINEAR_TYPES as _LINEAR, role_names

_CONV = (nn.Conv2d, nn.Conv3d)


@dataclasses.dataclass
class IA3Config(PeftConfig):
    """(IA)3 configuration (field names and defaults as in Hugging Face PEFT).

    Args:
        target_modules: modules to rescale (names, dotted suffixes, a full-match regex or "all-linear");
            None picks PEFT's default for the architecture: keys (queries on some), values and the FFN output
            projection.
        exclude_modules: names or regex never to target.
        feedforward_modules: the targets whose *input* is rescaled (a subset of target_modules; a list
            entry matches a path that ends with it, a string is a full-match regex). None picks the
            architecture's FFN output projection (none on an architecture the role table does not know).
        fan_in_fan_out: the base weight is stored (in, out), as GPT-2's Conv1D (set automatically).
        modules_to_save: modules trained in full and saved with the adapter.
        init_ia3_weights: start the vectors at 1 (the identity); False draws them from a standard normal.
    """

    PEFT_TYPE: ClassVar[str] = "IA3"

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        ff, targets = self.feedforward_modules, self.target_modules
        if isinstance(ff, set) and isinstance(targets, set) and not ff <= targets:
            raise ConfigError(
                f"IA3Config.feedforward_modules: expected a subset of target_modules {sorted(targets)}, "
                f"but {sorted(set(ff) - set(targets))} are not targets"
            )
        self._check(isinstance(self.init_ia3_weights, bool), "init_ia3_weights", "True or False")


def is_feedforward(config: IA3Config, key: str) -> bool:
    """PEFT's rule: a regex full-matches the path, a list entry is a suffix of it (plain ``endswith``)."""
    ff = config.feedforward_modules
    if ff is None:
        return False
    if isinstance(ff, str):
        return re.fullmatch(ff, key) is not None
    return any(key.endswith(name) for name in ff)


def _weight_product(base: nn.Module, h: Tensor, conv: bool, transposed: bool) -> Tensor:
    """``W h`` through the base weight alone (no bias): Conv2d / Conv3d, GPT-2 Conv1D ((d_in, d_out)) or Linear."""
    w = base.weight
    if conv:
        return base._conv_forward(h, w, None)
    return h @ w if transposed else F.linear(h, w)


@register_method(
    "ia3",
    config=IA3Config,
    category="reparameterized",
    modalities=("text", "vision", "vision-language", "generation"),
    mergeable=True,
    param_formula="d_out per target (d_in for feedforward targets)",
    position="vector rescaling each target's output (its input for FFN targets)",
    paper="arXiv 2205.05638 ((IA)3, T-Few)",
    examples={"ia3": {}},
)
class IA3Adapter(Adapter):
    supported_layers = _LINEAR + _CONV
    # PEFT's defaults (model type or family -> roles): keys, values (GPT-2: the fused c_attn) and the FFN
    # output projection, as in the paper; PEFT's table takes queries instead of keys on some architectures
    default_roles = {
        "*": ("key", "value", "ffn_out"),
        **dict.fromkeys(("bart", "gptj", "gpt_neo", "phi", "llama4", "gemma", "gemma2", "gemma3_text", "qwen2",
                         "qwen3"), ("query", "value", "ffn_out")),
        "opt": ("query", "key", "ffn_out"),
        # mT5's FFN is gated: scaling the up projection's output (wi_1) scales the FFN's inner activation
        "mt5": ("key", "value", "ffn_in"),
    }
    feedforward_roles = {"*": ("ffn_out",), "mt5": ()}
    checkpoint_keys: ClassVar[dict[str, str]] = {"ia3_l": "ia3_l"}

    def __init__(self, base: nn.Module, config: IA3Config, key: str = "", init: bool = True) -> None:
        super().__init__()
        self.feedforward = is_feedforward(config, key)
        self.conv = isinstance(base, _CONV)
        self.transposed = is_transposed(base)
        # output scaling also scales the bias when merged; input scaling leaves it alone
        self.merged_params = ("weight",) if self.feedforward else ("weight", "bias")
        d_out, d_in = layer_dims(base)
        n = d_in if self.feedforward else d_out
        if self.conv:
            shape: tuple[int, ...] = (1, n) + (1,) * len(base.kernel_size)
        else:
            shape = (1, n) if self.feedforward else (n, 1)
        w = base.weight
        # fp32 vectors on half-precision / quantized bases
        self.ia3_l = nn.Parameter(torch.ones(shape, device=w.device, dtype=adapter_dtype(base)))
        if init and not config.init_ia3_weights:
            with torch.no_grad():
                self.ia3_l.copy_(torch.randn(shape))

    @classmethod
    def prepare_config(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: IA3Config) -> None:
        """``feedforward_modules=None`` becomes the architecture's FFN output projection, as PEFT fills it
        from its per-model table (written into the config, so a saved file names it explicitly)."""
        if config.feedforward_modules is None:
            config.feedforward_modules = role_names(model, named, cls.feedforward_roles)

    @classmethod
    def param_count(cls, base: nn.Module, config: IA3Config, key: str = "") -> int:
        """Closed form: d_out per target, d_in (input channels) for feedforward targets."""
        d_out, d_in = layer_dims(base)
        return d_in if is_feedforward(config, key) else d_out

    # -- forward ---------------------------------------------------------------------------------------
    def _scale(self) -> Tensor:
        """``l`` broadcasting over an activation: channels on axis 1 for conv, the last axis otherwise."""
        return self.ia3_l if self.conv else self.ia3_l.reshape(-1)

    def fused_forward(self, base: nn.Module, x: Tensor) -> Tensor | None:
        """PEFT's computation: ``base(l * x)`` for a feedforward target (the base runs once)."""
        if not self.feedforward:
            return None
        scale = self._scale()
        return base((x.to(scale.dtype) * scale).to(x.dtype))

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        scale = self._scale()
        if not self.feedforward:
            return (out.to(scale.dtype) * scale).to(out.dtype)
        # input scaling given the base output: W (l x) + b = (W x + b) + W ((l - 1) x)
        h = (x.to(scale.dtype) * (scale - 1)).to(x.dtype)
        return out + _weight_product(base, h, self.conv, self.transposed).to(out.dtype)

    @classmethod
    def batched_forward(
        cls, adapters: list["IA3Adapter"], base: nn.Module, x: Tensor, out: Tensor, index: Tensor, cache: dict
    ) -> Tensor | None:
        """Mixed batch: the vectors stacked (n + 1, c) with a slot of ones for rows without an adapter here,
        gathered per row; output scaling multiplies ``out``, input scaling adds ``W ((l - 1) x)``."""
        first = adapters[0]
        if cls.forward is not IA3Adapter.forward:
            return None
        if any(a.feedforward != first.feedforward or a.ia3_l.dtype != first.ia3_l.dtype for a in adapters):
            return None
        params = [a.ia3_l for a in adapters]
        (L,) = cached_stack(cache, "ia3", params, lambda: (torch.cat(
            [p.reshape(1, -1) for p in params] + [params[0].new_ones(1, params[0].numel())]),))
        rows = L.index_select(0, index)  # (batch, c)
        if not first.feedforward:
            scale = row_view(rows, out.dim(), 1 if first.conv else out.dim() - 1)
            return (out.to(scale.dtype) * scale).to(out.dtype)
        scale = row_view(rows - 1, x.dim(), 1 if first.conv else x.dim() - 1)
        h = (x.to(scale.dtype) * scale).to(x.dtype)
        return out + _weight_product(base, h, first.conv, first.transposed).to(out.dtype)

    # -- merge -----------------------------------------------------------------------------------------
    def _weight_scale(self, weight: Tensor, base: nn.Module) -> Tensor:
        """``l`` shaped to broadcast over the base weight's output (or, feedforward, input) axis."""
        if self.conv and self.feedforward and base.groups > 1:
            # grouped conv: weight (c_out, c_in / groups, ...); input channel g * c_in/groups + j sits at column j
            groups = base.groups
            per_in, per_out = base.in_channels // groups, base.out_channels // groups
            l = self.ia3_l.reshape(groups, 1, per_in).expand(groups, per_out, per_in)
            return l.reshape(base.out_channels, per_in, *([1] * (weight.dim() - 2))).to(weight.dtype)
        axis = 1 if self.feedforward != self.transposed else 0  # Conv1D stores (d_in, d_out)
        shape = [1] * weight.dim()
        shape[axis] = -1
        return self.ia3_l.reshape(shape).to(weight.dtype)

    @staticmethod
    def _divide(value: Tensor, scale: Tensor) -> Tensor:
        # entries scaled by 0 cannot be recovered by division; the wrapper's exact-restore record fills them
        return torch.where(scale == 0, torch.zeros_like(value), value / scale)

    def merge(self, base: nn.Module, weight: Tensor) -> tuple[Tensor, Any]:
        return weight * self._weight_scale(weight, base), None

    def unmerge(self, base: nn.Module, weight: Tensor, state: Any) -> Tensor:
        return self._divide(weight, self._weight_scale(weight, base))

    def merge_param(self, base: nn.Module, name: str, value: Tensor) -> Tensor:
        return value * self.ia3_l.reshape(-1).to(value.dtype)

    def unmerge_param(self, base: nn.Module, name: str, value: Tensor) -> Tensor:
        return self._divide(value, self.ia3_l.reshape(-1).to(value.dtype))
