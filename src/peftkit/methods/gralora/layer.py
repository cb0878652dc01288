"""GraLoRA (Jung et al. 2025, arXiv 2505.20355): granular low-rank adaptation.

The weight ``W`` (d_out x d_in) is split into a ``k x k`` grid of blocks, each with its own LoRA of rank
``r / k``; the update is the block matrix of those products, scaled:

    dW = s [ B_{j,n} A_{j,n} ]_{j,n = 1..k},   B_{j,n}: (d_out / k) x (r / k),   A_{j,n}: (r / k) x (d_in / k)

so the parameter count is LoRA's at rank r, ``r (d_in + d_out)``, while ``dW`` may reach rank ``k r``. Hybrid
GraLoRA adds a plain LoRA of rank ``hybrid_r`` over the whole layer: ``dW += s B_g A_g``;
``s = alpha / (r + hybrid_r)``.

Tensors and file keys (as Hugging Face PEFT): ``gralora_A`` (k, d_in / k, r) holds, for input block n, the
factors ``A_{j,n}^T`` of all output blocks j side by side (group j = columns ``j r/k .. (j+1) r/k``);
``gralora_B`` (k, r, d_out / k) holds, for output block j, ``B_{j,n}^T`` of all input blocks n stacked (rows
``n r/k .. (n+1) r/k``); with ``hybrid_r``: ``gralora_A_general.weight`` (hybrid_r, d_in) and
``gralora_B_general.weight`` (d_out, hybrid_r). Linear and GPT-2 Conv1D layers; ``gralora_k`` must divide r
and both sides of every target (checked at ``get_peft_model``, before the model changes).

Initialisation as PEFT (``init_weights``): per block, ``A`` Kaiming-uniform then ``B`` zero (False: both
Kaiming-uniform), drawn in PEFT's order from the global generator. PEFT's layout agrees with the paper's
independent block adapters; the hybrid branch draws its own dropout mask, as PEFT.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import ConfigError
from ...kernel_helpers import adapter_dtype, is_transposed, layer_dims
from ...layers import Adapter
from ...registry import register_method
from ...targeting import LINEAR_TYPES
from . import functional as GF
from .config import GraloraConfig


def _check_divides(key: str, d_out: int, d_in: int, config: GraloraConfig) -> None:
    k = config.gralora_k
    if d_in % k or d_out % k:
        g = math.gcd(d_in, d_out, config.r)
        allowed = [v for v in range(1, g + 1) if g % v == 0]
        raise ConfigError(
            f"{key or 'layer'}: GraloraConfig.gralora_k={k} must divide the layer's in_features ({d_in}) and "
            f"out_features ({d_out}) and r ({config.r}); allowed gralora_k values for this layer: {allowed}"
        )


@register_method(
    "gralora",
    config=GraloraConfig,
    category="reparameterized",
    modalities=("text", "vision", "vision-language", "generation"),
    mergeable=True,
    param_formula="(r + hybrid_r) (d_in + d_out) per target (k^2 blocks of rank r / k)",
    position="weight delta: a k x k grid of rank r/k LoRAs beside each targeted layer",
    paper="arXiv 2505.20355 (GraLoRA)",
    examples={"gralora": {"r": 4, "gralora_k": 2, "hybrid_r": 2, "alpha": 6}},
)
class GraloraAdapter(Adapter):
    supported_layers = LINEAR_TYPES
    default_roles = ("query", "value")  # PEFT's GraLoRA defaults are its LoRA defaults

    def __init__(self, base: nn.Module, config: GraloraConfig, key: str = "", init: bool = True) -> None:
        super().__init__()
        self.d_out, self.d_in = layer_dims(base)
        _check_divides(key, self.d_out, self.d_in, config)
        self.r, self.k, self.hybrid_r = config.r, config.gralora_k, config.hybrid_r
        self.scaling = config.alpha / (config.r + config.hybrid_r)
        self.transposed = is_transposed(base)
        self.dropout = nn.Dropout(config.gralora_dropout) if config.gralora_dropout > 0 else nn.Identity()
        k, r = self.k, self.r
        device, dtype = base.weight.device, adapter_dtype(base)
        self.gralora_A = nn.Parameter(torch.zeros(k, self.d_in // k, r, device=device, dtype=dtype))
        self.gralora_B = nn.Parameter(torch.zeros(k, r, self.d_out // k, device=device, dtype=dtype))
        if self.hybrid_r:
            self.gralora_A_general = nn.Parameter(torch.zeros(self.hybrid_r, self.d_in, device=device, dtype=dtype))
            self.gralora_B_general = nn.Parameter(torch.zeros(self.d_out, self.hybrid_r, device=device, dtype=dtype))
        if init:
            with torch.no_grad():
                self._init_weights(config)

    def _init_weights(self, config: GraloraConfig) -> None:
        """PEFT's draws, in its order: per block A (r, d_in/k) then B (d_out/k, r); then the hybrid pair
        (each first initialised as an nn.Linear, then re-drawn)."""
        blocks_a, blocks_b = [], []
        for _ in range(self.k):
            a = torch.empty(self.r, self.d_in // self.k)
            b = torch.zeros(self.d_out // self.k, self.r)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            if not config.init_weights:
                nn.init.kaiming_uniform_(b, a=math.sqrt(5))
            blocks_a.append(a)
            blocks_b.append(b)
        self.gralora_A.copy_(torch.stack(blocks_a).transpose(1, 2))
        self.gralora_B.copy_(torch.stack(blocks_b).transpose(1, 2))
        if self.hybrid_r:
            a = nn.Linear(self.d_in, self.hybrid_r, bias=False).weight
            b = nn.Linear(self.hybrid_r, self.d_out, bias=False).weight
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(b) if config.init_weights else nn.init.kaiming_uniform_(b, a=math.sqrt(5))
            self.gralora_A_general.copy_(a)
            self.gralora_B_general.copy_(b)

    @property
    def checkpoint_keys(self) -> dict[str, str]:  # type: ignore[override]
        keys = {"gralora_A": "gralora_A", "gralora_B": "gralora_B"}
        if self.hybrid_r:
            keys.update(gralora_A_general="gralora_A_general.weight", gralora_B_general="gralora_B_general.weight")
        return keys

    @classmethod
    def param_count(cls, base: nn.Module, config: GraloraConfig, key: str = "") -> int:
        """Closed form: ``(r + hybrid_r) (d_in + d_out)``."""
        d_out, d_in = layer_dims(base)
        return (config.r + config.hybrid_r) * (d_in + d_out)

    # -- forward and merge ---------------------------------------------------------------------------------
    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        xd = self.dropout(x.to(self.gralora_A.dtype))
        out = out + (self.scaling * GF.block_forward(xd, self.gralora_A, self.gralora_B)).to(out.dtype)
        if self.hybrid_r:
            xh = self.dropout(x.to(self.gralora_A.dtype))  # its own mask, as PEFT
            h = F.linear(F.linear(xh, self.gralora_A_general), self.gralora_B_general)
            out = out + (self.scaling * h).to(out.dtype)
        return out

    def delta_weight(self, base: nn.Module) -> Tensor:
        """``s dW`` in the base weight's layout ((d_in, d_out) for GPT-2's Conv1D)."""
        delta = GF.block_delta(self.gralora_A, self.gralora_B)
        if self.hybrid_r:
            delta = delta + self.gralora_B_general @ self.gralora_A_general
        delta = delta.t() if self.transposed else delta
        return delta * self.scaling
