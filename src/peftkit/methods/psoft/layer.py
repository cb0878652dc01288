"""PSOFT (arXiv 2505.11235): orthogonal fine-tuning in the principal subspace, on Linear and GPT-2 Conv1D.

OFT's orthogonal rotation, restricted to the top-r principal subspace of the pre-trained weight. With
``W ~ U_r S_r V_r^T`` (its top-r SVD) split into frozen ``B`` (d_out, r) and ``A`` (r, d_in), ``s B A`` =
``U_r S_r V_r^T`` (``s = psoft_alpha / r``), the paper rotates the principal part:

    W' = W + s B (R - I) A,    R = diag(m_b) (I + Q)(I - Q)^-1 diag(m_a)

with ``Q`` (r, r) skew-symmetric (its r (r - 1) / 2 upper entries trained) and the optional magnitude
vectors ``m_b``, ``m_a`` (r,) trained; ``psoft_orth=False`` trains ``R`` as a free r x r matrix instead, and
``use_cayley_neumann`` replaces the inverse by PEFT's truncated Neumann series. ``R = I`` at init, so the
model starts at the base. "psoft_init" (the default) takes ``A = V_r^T`` (orthonormal rows, so ``R``'s
orthogonality is preserved in the weight's column space) and ``B = U_r S_r / s``; "pissa_init" splits
``sqrt(S_r / s)`` over both.

File keys as Hugging Face PEFT: ``psoft_R.weight`` (r (r - 1) / 2,) or (r, r), ``psoft_R.vector_b`` (r,),
``psoft_R.vector_a`` (r,). ``A`` and ``B`` are never saved: they are rebuilt from the base weight's SVD
when the adapter is built (also on load; the low-rank SVD is seeded with ``random_seed``), so a file loads
onto the base it was trained on. Merging adds ``s B (R - I) A``. Unlike PEFT (0.21), GPT-2's Conv1D is
wrapped too (the SVD of the equivalent ``nn.Linear``'s weight; the delta transposed into the base layout);
a base with integer (quantized) weights is dequantized for the SVD where PEFT refuses it.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from ...kernel_helpers import CONV1D_TYPES, adapter_dtype, is_transposed, layer_dims
from ...layers import Adapter
from ...quant import dequantize_weight
from ...registry import register_method
from . import functional as PF
from .config import PsoftConfig

_SUPPORTED = (nn.Linear,) + CONV1D_TYPES


def _rank_param_count(config: PsoftConfig) -> int:
    r = config.r
    return (r * (r - 1) // 2 if config.psoft_orth else r * r) + r * config.psoft_mag_b + r * config.psoft_mag_a


@register_method(
    "psoft",
    config=PsoftConfig,
    category="reparameterized",
    modalities=("text", "vision", "vision-language", "generation"),
    mergeable=True,
    param_formula="r (r - 1) / 2 (+ r per magnitude vector) per target; A, B frozen (SVD of W)",
    position="weight delta s B (R - I) A beside each targeted layer; B A W's principal subspace (frozen)",
    paper="arXiv 2505.11235 (PSOFT)",
    examples={"psoft": {"r": 4, "psoft_alpha": 8}},
)
class PsoftAdapter(Adapter):
    supported_layers = _SUPPORTED
    default_roles = ("query", "value")  # PEFT's PSOFT defaults are its LoRA defaults
    checkpoint_keys: ClassVar[dict[str, str]] = {
        "psoft_R": "psoft_R.weight", "vector_b": "psoft_R.vector_b", "vector_a": "psoft_R.vector_a",
    }

    def __init__(self, base: nn.Module, config: PsoftConfig, key: str = "", init: bool = True) -> None:
        super().__init__()
        if not isinstance(base, _SUPPORTED):
            raise TypeError(f"{key}: PSOFT wraps Linear and GPT-2 Conv1D layers, not {type(base).__name__}")
        self.d_out, self.d_in = layer_dims(base)
        r = self.r = int(config.r)
        if r > min(self.d_in, self.d_out):
            raise ValueError(
                f"{key}: PsoftConfig.r={r} exceeds the rank this {self.d_out} x {self.d_in} layer can have; "
                f"allowed: 1 <= r <= min(in_features, out_features) = {min(self.d_in, self.d_out)}"
            )
        self.transposed = is_transposed(base)
        self.scaling = config.psoft_alpha / r
        self.orth = bool(config.psoft_orth)
        self.neumann = int(config.num_cayley_neumann_terms) if config.use_cayley_neumann else None
        self.eps = config.cayley_neumann_eps
        w = base.weight
        dtype = adapter_dtype(base)  # fp32 on half-precision / quantized bases
        shape = (r * (r - 1) // 2,) if self.orth else (r, r)
        self.psoft_R = nn.Parameter(torch.empty(shape, device=w.device, dtype=dtype))
        self.vector_b = nn.Parameter(torch.empty(r, device=w.device, dtype=dtype)) if config.psoft_mag_b else None
        self.vector_a = nn.Parameter(torch.empty(r, device=w.device, dtype=dtype)) if config.psoft_mag_a else None
        if not config.psoft_mag_b:
            self.checkpoint_keys = {k: v for k, v in self.checkpoint_keys.items() if k != "vector_b"}
        if not config.psoft_mag_a:
            self.checkpoint_keys = {k: v for k, v in self.checkpoint_keys.items() if k != "vector_a"}
        rows, cols = torch.triu_indices(r, r, 1, device=w.device)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.dropout = nn.Dropout(config.psoft_dropout) if config.psoft_dropout > 0 else nn.Identity()
        with torch.no_grad():  # the frozen principal factors: rebuilt from the base on every build (never saved)
            weight = w if w.is_floating_point() else dequantize_weight(base)
            weight = (weight.t() if self.transposed else weight).to(torch.float32)
            a, b = PF.principal_factors(weight, r, self.scaling, config.ab_svd_init, config.psoft_svd,
                                        config.psoft_svd_lowrank_niter, config.random_seed)
        self.register_buffer("psoft_A", a.to(dtype), persistent=False)  # (r, d_in)
        self.register_buffer("psoft_B", b.to(dtype), persistent=False)  # (d_out, r)
        if init:
            with torch.no_grad():
                if self.orth:
                    nn.init.zeros_(self.psoft_R) if config.init_weights else nn.init.normal_(self.psoft_R, 0.0, 0.1)
                else:
                    nn.init.eye_(self.psoft_R)
                    if not config.init_weights:
                        self.psoft_R.add_(torch.randn_like(self.psoft_R) * 0.1)
                for v in (self.vector_b, self.vector_a):
                    if v is not None:
                        v.fill_(1.0)

    @classmethod
    def param_count(cls, base: nn.Module, config: PsoftConfig, key: str = "") -> int:
        """Closed form: r (r - 1) / 2 (``psoft_orth``; r^2 otherwise), plus r per magnitude vector."""
        return _rank_param_count(config)

    def rotation(self) -> Tensor:
        """``R`` (r, r) with the magnitude vectors applied."""
        if self.orth:
            q = PF.skew(self.psoft_R, self.r, self.rows, self.cols)
            r = PF.cayley(q) if self.neumann is None else PF.cayley_neumann(q, self.neumann, self.eps)
        else:
            r = self.psoft_R
        return PF.scaled(r, self.vector_b, self.vector_a)

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        """``out + s ((x A^T) R^T - x A^T) B^T`` (PEFT's order)."""
        a, b = self.psoft_A, self.psoft_B
        xa = self.dropout(x.to(a.dtype)) @ a.t()
        xr = xa @ self.rotation().to(a.dtype).t()
        return out + (((xr - xa) @ b.t()) * self.scaling).to(out.dtype)

    def delta_weight(self, base: nn.Module) -> Tensor:
        """``s B (R - I) A`` in the base weight's layout ((d_in, d_out) for GPT-2's Conv1D)."""
        delta = PF.psoft_delta(self.psoft_A, self.psoft_B, self.rotation(), self.scaling)
        return delta.t() if self.transposed else delta
