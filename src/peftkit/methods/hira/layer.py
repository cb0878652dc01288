"""HiRA (Huang et al., "HiRA: Parameter-Efficient Hadamard High-Rank Adaptation for Large Language Models",
ICLR 2025, OpenReview TwJrTz9cRS) on Linear, GPT-2 Conv1D, Embedding and Conv1d/2d/3d layers.

The paper's update is the Hadamard product of the frozen weight with a rank-r matrix:

    W = W0 + W0 * (B A),      h = W0 x + (W0 * B A) x

with ``A`` (r, d_in) and ``B`` (d_out, r) (Linear / Conv1D, in the (d_out, d_in) layout; GPT-2's Conv1D
weight is stored transposed and the update is transposed with it). ``W0 * BA`` has rank up to
rank(W0) r, far above r. ``B`` starts at zero, so the model starts at the base. On a plain Linear / Conv1D
(no hooks, no active dropout) the two products are one, ``h = (W0 + W0 * BA) x + b`` (PEFT computes both).

As in PEFT (0.21), whose files (``hira_A`` / ``hira_B``; on embeddings ``hira_embedding_A`` (r, num_embeddings)
and ``hira_embedding_B`` (dim, r)) and numbers this follows:

- an Embedding's update is ``W0 * (B A)^T`` looked up without the base's padding / max-norm options; there
  ``init_weights`` True or ``"gaussian"`` sets ``A`` to zero and ``B`` standard normal (the reverse of Linear);
- a convolution's modulation is ``sum_r B[o, r] A[r, i, k..]`` with ``A`` (r, c_in, *k), ``B`` (c_out, r, 1..),
  and grouped convolutions are refused (a ``ConfigError`` naming the module here, before the model changes);
- ``"gaussian"`` draws ``A`` with std 1 / r on Linear / Conv1D only (convolutions take Kaiming uniform);
- ``rank_pattern`` is accepted and saved but not applied: PEFT 0.21 computes the per-module rank and then
  builds the layer with ``r`` (its ``dispatch_default`` reads ``hira_config.r``), so its files hold rank r
  everywhere; peftkit does the same so that files of either library load in the other.

Difference from PEFT: PEFT merges several adapters of a layer at once as ``W0 (1 + M_1 + M_2 ..)`` from the
weight before the merge; here each merge acts on the weight it finds (``W (1 + M)``), so merging several
HiRA adapters into one layer composes them multiplicatively (one adapter: identical). Unmerge divides by
``1 + M`` and the wrapper restores the base bit for bit.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import ConfigError
from ...kernel_helpers import CONV1D_TYPES, adapter_dtype, has_hooks, is_transposed, layer_dims
from ...layers import Adapter
from ...registry import register_method
from ...targeting import LINEAR_TYPES
from . import functional as HF
from .config import HiraConfig

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _shapes(base: nn.Module, r: int, key: str) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape on ``base``; a ConfigError naming the module for grouped convolutions."""
    d_out, d_in = layer_dims(base)
    if isinstance(base, nn.Embedding):
        return {"hira_embedding_A": (r, d_in), "hira_embedding_B": (d_out, r)}
    if isinstance(base, _CONV):
        if base.groups != 1:
            raise ConfigError(f"{key or type(base).__name__}: HiRA's Hadamard product needs a weight of shape "
                              f"(c_out, c_in, *k); a grouped convolution (groups={base.groups}) has none; "
                              "expected groups=1 (leave this module out of target_modules)")
        k = tuple(base.kernel_size)
        return {"hira_A": (r, d_in, *k), "hira_B": (d_out, r, *(1,) * len(k))}
    return {"hira_A": (r, d_in), "hira_B": (d_out, r)}


@register_method(
    "hira",
    config=HiraConfig,
    category="reparameterized",
    modalities=("text", "vision", "vision-language", "generation"),
    mergeable=True,
    param_formula="r (d_in + d_out) per target (conv: r (c_in k^2 + c_out))",
    position="weight update W0 * (B A) beside each targeted layer",
    paper="OpenReview TwJrTz9cRS (HiRA, ICLR 2025)",
    examples={"hira": {"r": 2}},
)
class HiraAdapter(Adapter):
    supported_layers = (nn.Linear, nn.Embedding, *_CONV) + CONV1D_TYPES
    default_roles = ("query", "value")  # PEFT's HiRA defaults are its LoRA defaults

    def __init__(self, base: nn.Module, config: HiraConfig, key: str = "", init: bool = True) -> None:
        super().__init__()
        self.r = config.r  # PEFT 0.21 builds every layer with config.r (its rank_pattern is not applied)
        self.embedding = isinstance(base, nn.Embedding)
        self.conv = len(base.kernel_size) if isinstance(base, _CONV) else 0
        self.transposed = is_transposed(base)
        shapes = _shapes(base, self.r, key)
        self._names = tuple(shapes)
        w = base.weight
        dtype = adapter_dtype(base)  # fp32 on half-precision / quantized bases
        for name, shape in shapes.items():  # PEFT's order: A then B, both standard normal first
            self.register_parameter(name, nn.Parameter(torch.randn(shape, dtype=dtype).to(w.device)))
        self.dropout = nn.Dropout(config.hira_dropout) if config.hira_dropout > 0 else nn.Identity()
        if init and config.init_weights:
            with torch.no_grad():
                self._init_weights(config.init_weights)

    def _init_weights(self, mode: bool | str) -> None:
        a, b = self._factors()
        if self.embedding:
            nn.init.zeros_(a)
            nn.init.normal_(b)
            return
        if mode == "gaussian" and not self.conv:
            nn.init.normal_(a, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(b)

    @property
    def checkpoint_keys(self) -> dict[str, str]:  # type: ignore[override]
        return {name: name for name in self._names}

    @classmethod
    def param_count(cls, base: nn.Module, config: HiraConfig, key: str = "") -> int:
        """Closed form: r (d_in + d_out) per target (conv: r (c_in k^2 + c_out))."""
        return sum(math.prod(s) for s in _shapes(base, config.r, key).values())

    # -- weights ---------------------------------------------------------------------------------------
    def _factors(self) -> tuple[Tensor, Tensor]:
        a, b = self._names
        return getattr(self, a), getattr(self, b)

    def modulation(self) -> Tensor:
        """``M`` in the base weight's layout: ``BA`` (Conv1D: transposed, Embedding: (num_embeddings, dim))."""
        m = HF.modulation(*self._factors())
        return m.t() if self.transposed or self.embedding else m

    def delta_weight(self, base: nn.Module) -> Tensor:
        """``W0 * M`` in the base weight's layout (the weight the layer holds now)."""
        return base.weight * self.modulation().to(base.weight.dtype)

    def merge(self, base: nn.Module, weight: Tensor) -> tuple[Tensor, Any]:
        return HF.hadamard_merge(weight, self.modulation()), None

    def unmerge(self, base: nn.Module, weight: Tensor, state: Any) -> Tensor:
        return HF.hadamard_unmerge(weight, self.modulation())

    # -- forward ---------------------------------------------------------------------------------------
    def fused_forward(self, base: nn.Module, x: Tensor) -> Tensor | None:
        """One product with ``W0 + W0 * M`` and the base bias instead of PEFT's two (the base's and the
        modulated weight's): a plain Linear / Conv1D base of the adapter's dtype, no hooks, no autocast, no
        active dropout (the two branches see the same input)."""
        w = base.weight
        if self.embedding or self.conv or type(base) not in LINEAR_TYPES or has_hooks(base):
            return None
        if (self.training and isinstance(self.dropout, nn.Dropout)) or w.dtype != self._factors()[0].dtype:
            return None
        if x.dtype != w.dtype or torch.is_autocast_enabled(x.device.type):
            return None
        weight = w + w * self.modulation()  # the base weight's layout
        return F.linear(x, weight.t() if self.transposed else weight, base.bias)

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        m = self.modulation()
        w = base.weight.to(m.dtype) * m  # W0 * M: (d_out, d_in) / (d_in, d_out) / (num, dim) / conv kernel
        if self.embedding:  # PEFT looks the modulated table up without the base's padding / norm options
            return out + F.embedding(x, w).to(out.dtype)
        x = self.dropout(x.to(m.dtype))
        if self.conv:
            y = _CONV_FN[self.conv](x, w, None, base.stride, base.padding, base.dilation, base.groups)
        else:
            y = F.linear(x, w.t() if self.transposed else w)
        return out + y.to(out.dtype)
