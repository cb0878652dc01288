"""BEFT (Huang et al. 2025, arXiv 2509.15974): bias-efficient fine-tuning of the value projections.

The paper compares fine-tuning the query, key and value projections' biases and finds the value bias the
most effective choice; BEFT trains only that one, everything else frozen:

    v = W_v x + b_v + delta_b,        delta_b in R^{1 x d_out}, zero at the start

so the model starts at the base, and ``d_out`` parameters train per targeted value projection (one
attention layer of width 768: 768 parameters).

As Hugging Face PEFT (whose files this module reads and writes): the trained bias is a new tensor
``beft_bias`` of shape (1, d_out) added to the layer's output (file key ``<path>.beft_bias``), so a layer
without a bias (Llama's ``v_proj``, T5's ``v``) is adapted too, with a warning. Default targets: PEFT's BEFT
table (the value projection by role). ``init_weights=False`` draws the bias from a standard normal.

Merging adds ``delta_b`` to the base bias (unmerge restores it bit for bit). Deliberate differences from PEFT:

- merging into a layer without a bias *adds* one (``b = delta_b``; unmerge removes it again), where PEFT
  raises; ``merge_and_unload`` then returns a model with biases its config does not declare (a warning says
  so at merge time);
- GPT-2's Conv1D is wrapped too (PEFT wraps ``nn.Linear`` only); GPT-2 has no default target (its query, key
  and value are one fused ``c_attn``, not in PEFT's table either): ``BeftConfig()`` there raises
  ``NotApplicableError``, explicit ``target_modules`` work.

Forward: on a plain Linear / Conv1D the delta joins the base bias inside the one GEMM (``F.linear(x, W,
b0 + delta_b)``: no extra pass over the output); otherwise it is added in place to the base output.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ...default_targets import ROLE_TABLE
from ...kernel_helpers import CONV1D_TYPES, adapter_dtype, has_hooks, layer_dims
from ...layers import Adapter
from ...registry import register_method
from ...targeting import NotApplicableError, find_targets, model_family
from ..selective.functional import weight_op
from . import functional as BF
from .config import BeftConfig

_SUPPORTED = (nn.Linear,) + CONV1D_TYPES


@register_method(
    "beft",
    config=BeftConfig,
    category="selective",
    modalities=("text", "vision", "vision-language", "generation"),
    mergeable=True,
    param_formula="d_out per target (the value projection's bias)",
    position="bias added to each value projection's output",
    paper="arXiv 2509.15974 (BEFT)",
    examples={"beft": {}},
)
class BeftAdapter(Adapter):
    supported_layers = _SUPPORTED
    default_roles = ("value",)  # PEFT's BEFT table: the value projection of each architecture
    checkpoint_keys: ClassVar[dict[str, str]] = {"beft_bias": "beft_bias"}
    merged_params = ("bias",)

    def __init__(self, base: nn.Module, config: BeftConfig, key: str = "", init: bool = True) -> None:
        super().__init__()
        if not isinstance(base, _SUPPORTED):
            raise TypeError(f"{key}: BEFT wraps Linear and GPT-2 Conv1D layers, not {type(base).__name__}")
        self.key = key
        self.d_out = layer_dims(base)[0]
        w = base.weight
        self.beft_bias = nn.Parameter(torch.zeros(1, self.d_out, device=w.device, dtype=adapter_dtype(base)))
        if init:
            drawn = torch.randn((1, self.d_out))  # PEFT draws first, then zeroes (the same random stream)
            if not config.init_weights:
                with torch.no_grad():
                    self.beft_bias.copy_(drawn)
            if getattr(base, "bias", None) is None:
                warnings.warn(f"BEFT: {key or 'the base layer'} has no bias term; the adapter adds its own, and "
                              "merging adds a bias parameter to the layer (PEFT cannot merge here)", stacklevel=2)
        self.op = weight_op(base)

    @classmethod
    def select_targets(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: Any) -> list[str]:
        """The config's targets; by default the value projection, which a fused q/k/v projection is not."""
        family = model_family(model)
        if config.target_modules is None and family is not None and "value" not in ROLE_TABLE[family]:
            raise NotApplicableError(
                f"BEFT trains the value projection's bias; {type(model).__name__} fuses query, key and value into "
                f"one projection ({ROLE_TABLE[family].get('qkv')!r}), which has no default: set "
                "BeftConfig.target_modules explicitly")
        return find_targets(model, named, config, cls.default_roles, cls.supported_layers)

    @classmethod
    def param_count(cls, base: nn.Module, config: BeftConfig, key: str = "") -> int:
        """Closed form: d_out per target."""
        return layer_dims(base)[0]

    # -- forward -------------------------------------------------------------------------------------------
    def fused_forward(self, base: nn.Module, x: Tensor) -> Tensor | None:
        """``op(x, W, b0 + delta_b)``: one GEMM, no pass over the output (plain Linear / Conv1D, same dtypes)."""
        w, b = getattr(base, "weight", None), self.beft_bias
        if self.op is None or has_hooks(base) or torch.is_autocast_enabled(x.device.type):
            return None
        if not (x.dtype == w.dtype == b.dtype):
            return None
        return BF.beft_fused(self.op, x, w, base.bias, b)

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        return BF.beft_add(out, self.beft_bias)

    # -- merge into the base bias --------------------------------------------------------------------------
    def merge_param(self, base: nn.Module, name: str, value: Tensor) -> Tensor:
        return BF.beft_merge_bias(value, self.beft_bias.detach())

    def unmerge_param(self, base: nn.Module, name: str, value: Tensor) -> Tensor:
        return BF.beft_unmerge_bias(value, self.beft_bias.detach())

    def missing_param(self, base: nn.Module, name: str) -> Tensor | None:
        """A bias-free layer gets a zero bias to merge into (removed again on unmerge)."""
        warnings.warn(f"BEFT: merging into {self.key or 'a layer'} adds a bias the model's config does not declare "
                      "(PEFT refuses to merge into a layer without a bias)", stacklevel=2)
        w = base.weight
        return torch.zeros(self.d_out, device=w.device, dtype=w.dtype)

    def effective_param(self, base: nn.Module, name: str, value: Tensor) -> Tensor:
        """The weight as it is, the bias plus ``delta_b`` (differentiable), for a parent that reads them."""
        if name != "bias":
            return value
        return value + self.beft_bias.reshape(-1).to(value.dtype)
