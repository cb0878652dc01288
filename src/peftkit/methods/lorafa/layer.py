"""LoRA-FA (Zhang et al. 2023, arXiv 2308.03303): LoRA with a frozen random down-projection, on Linear and GPT-2
Conv1D layers.

    h = W0 x + s B A x,      s = lora_alpha / r  (rsLoRA: lora_alpha / sqrt(r))

``A`` (r, d_in) is drawn once (Kaiming uniform, LoRA's init) and never trained; only ``B`` (d_out, r), starting at
zero, trains: r d_out parameters per layer, half of LoRA's on a square layer. The paper's point is memory: LoRA's
gradient ``dL/dA = s (dL/dh B)^T x`` needs the layer input ``x`` (n, d_in) kept from the forward pass, while
LoRA-FA's ``dL/dB = s (dL/dy)^T (A x)`` needs only the r-dimensional ``A x``; the input gradient needs ``W0``, ``A``
and ``B``, which are parameters. ``functional.FrozenALinear`` is that training path (one pass: base output plus
update, keeping ``W0``, ``A``, ``B`` and ``A x`` only); the reference path (``functional.lowrank_output``, used on
bases with hooks, under autocast and on mixed batches) keeps the same, since autograd saves no input of a product
with a frozen weight. With ``lora_dropout`` the dropout's mask of ``x`` is kept (one byte per entry), never the
dropped-out input.

Files: the keys of a LoRA file (``lora_A.weight``, ``lora_B.weight``, same shapes and scaling), so a LoRA-FA adapter
loads in Hugging Face PEFT as a plain LoRA (``PeftModel.from_pretrained(model, folder, config=LoraConfig(r=..,
lora_alpha=.., target_modules=..))``: the config file's ``peft_type`` is ``LORAFA``, which PEFT does not know) and
computes the same outputs there. peft 0.21 has LoRA-FA only as an optimizer over a LoRA model
(``create_lorafa_optimizer``: it freezes ``lora_A`` and, beyond this paper, rescales B's gradient by
``(A A^T)^-1 / s^2`` before its AdamW step); here it is an adapter type with the paper's plain update (any optimizer
trains B), and with its own fused kernel, since LoRA's (``lora/kernels.LoraLinear``) keeps ``x`` whether or not A
trains. Merge: ``W0 + s B A`` (bit-exact unmerge by the wrapper's restore record).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from ...kernel_helpers import CONV1D_TYPES, adapter_dtype, has_hooks, is_transposed, layer_dims
from ...layers import Adapter
from ...registry import register_method
from ...targeting import LINEAR_TYPES
from ..lora.functional import lora_delta
from . import functional as FA
from .config import LoraFAConfig

LINEAR_LAYERS = (nn.Linear,) + CONV1D_TYPES  # what the LoRA-like methods of this family adapt


def check_base(base: nn.Module, key: str, method: str) -> None:
    """The LoRA-like methods of this family adapt Linear and GPT-2 Conv1D layers only."""
    if not isinstance(base, LINEAR_LAYERS):
        raise TypeError(f"{key or 'target'}: {method} adapts Linear and GPT-2 Conv1D layers, not "
                        f"{type(base).__name__}; leave this module out of target_modules")


@register_method(
    "lorafa",
    config=LoraFAConfig,
    category="reparameterized",
    modalities=("text", "vision", "vision-language", "generation"),
    mergeable=True,
    param_formula="r d_out per target (A frozen)",
    position="weight delta beside each targeted layer (only the up-projection B trains)",
    paper="arXiv 2308.03303 (LoRA-FA)",
    examples={"lorafa": {"r": 4, "lora_alpha": 8}},
)
class LoraFAAdapter(Adapter):
    supported_layers = LINEAR_LAYERS
    default_roles = ("query", "value")
    checkpoint_keys: ClassVar[dict[str, str]] = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}

    def __init__(self, base: nn.Module, config: LoraFAConfig, key: str = "", init: bool = True) -> None:
        super().__init__()
        check_base(base, key, "LoRA-FA")
        self.r = r = config.r
        self.lora_alpha = config.lora_alpha
        self.unit_scaling = self.scaling = config.lora_alpha / (math.sqrt(r) if config.use_rslora else r)
        self.transposed = is_transposed(base)
        d_out, d_in = layer_dims(base)
        factory = {"device": base.weight.device, "dtype": adapter_dtype(base)}
        self.lora_A = nn.Parameter(torch.empty(r, d_in, **factory), requires_grad=False)  # frozen: the paper's A
        self.lora_B = nn.Parameter(torch.empty(d_out, r, **factory))
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else None
        if init:
            FA.init_factors(self.lora_A, self.lora_B, config.init_lora_weights)

    def requires_grad_(self, requires_grad: bool = True) -> "LoraFAAdapter":
        """Only ``B`` ever trains: ``A`` stays frozen whatever the tuner asks (the paper's fixed projection)."""
        self.lora_B.requires_grad_(requires_grad)
        self.lora_A.requires_grad_(False)
        return self

    @classmethod
    def param_count(cls, base: nn.Module, config: LoraFAConfig, key: str = "") -> int:
        """Closed form: B only, r d_out per target."""
        d_out, _ = layer_dims(base)
        return config.r * d_out

    # -- weights ---------------------------------------------------------------------------------------
    def delta_weight(self, base: nn.Module) -> Tensor:
        """``s B A`` in the base weight's layout (Conv1D: transposed)."""
        delta = lora_delta(self.lora_A, self.lora_B, self.scaling)
        return delta.t() if self.transposed else delta

    # -- forward ---------------------------------------------------------------------------------------
    def fused_forward(self, base: nn.Module, x: Tensor) -> Tensor | None:
        """Base and update in one pass (``functional.FrozenALinear``) on a plain Linear / Conv1D of the adapter's
        dtype without hooks or autocast, while the base weight and ``A`` are frozen; else None (reference path)."""
        w, A = base.weight, self.lora_A
        if type(base) not in LINEAR_TYPES or (type(base) is not nn.Linear) != self.transposed:
            return None
        if x.dtype != w.dtype or A.dtype != w.dtype or has_hooks(base) or torch.is_autocast_enabled(x.device.type):
            return None
        if w.requires_grad or A.requires_grad:
            return None
        d_in = A.shape[1]
        x2d = x.reshape(-1, d_in)
        xd = self.dropout(x2d) if self.dropout is not None else None
        out = FA.FrozenALinear.apply(x2d, xd, w, base.bias, A, self.lora_B, self.scaling, self.transposed)
        return out.view(*x.shape[:-1], out.shape[-1])

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        A = self.lora_A
        if x.dtype != A.dtype:
            x = x.to(A.dtype)
        if self.dropout is not None:
            x = self.dropout(x)
        return out + FA.lowrank_output(x, A, self.lora_B, self.scaling).to(out.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, lora_A frozen"
