"""SVDiff (Han et al. 2023, arXiv 2303.11305): fine-tune only the singular values of each weight ("spectral shifts").

Each targeted weight, as a matrix ``W`` (d_out, d_in') (a convolution kernel (d_out, c_in / groups, k, k) reshaped
to (d_out, c_in / groups k k), as the paper does), is decomposed once, when the adapter is built:
``W = U diag(sigma) V^T`` (thin SVD, r = min(d_out, d_in') singular values). The paper trains a shift ``delta``
(r,) of the singular values and keeps ``U``, ``sigma``, ``V`` frozen:

    W_delta = U diag(ReLU(sigma + delta)) V^T,        delta = 0 at the start

(the ReLU keeps the singular values non-negative). peftkit computes the layer with the same update written as a
delta of the base weight,

    W' = W + U diag(ReLU(sigma + delta) - sigma) V^T,

which equals the paper's ``W_delta`` up to the SVD's reconstruction error ``W - U diag(sigma) V^T`` (kept, where the
paper drops it), and is the base weight *exactly* at ``delta = 0`` (``ReLU(sigma) - sigma = 0`` for
``sigma >= 0``): the adapted model starts at the base bit for bit. Only ``delta`` trains: r parameters per
layer (a 320 x 320 x 3 x 3 convolution: 320).

Tensors and file: ``svdiff_delta`` (r,), the one trained tensor, saved dense under ``<module>.svdiff_delta``.
``U``, ``sigma``, ``V^T`` are non-persistent buffers, never saved: they are recomputed from the base weights
when the adapter is built or loaded (as Super-Tuning's indices without ``save_precomputed_indices``), so an
adapter must be loaded onto the base it was trained on. Dense, not sparse: a sparse layout (int32 index +
value per nonzero shift) costs 8 bytes per entry against 4 for the dense vector, so it is smaller only when
fewer than half the shifts are nonzero, and a trained ``delta`` is nonzero everywhere (every singular value with
``sigma + delta > 0`` gets a gradient); the whole file is r floats per layer already (the paper: ~1.7 MB for
Stable Diffusion's UNet).

Forward: ``op(x, W + D, b)`` through ``selective.functional.ReparamOp`` (Linear, GPT-2 Conv1D, Conv1d/2d/3d):
``W + D`` is formed per call and freed, the backward pass rebuilds it and maps the weight gradient ``G`` onto
``delta`` as ``diag(U^T G V) * 1[sigma + delta > 0]``, so training keeps no copy of the weight. With other
adapters on the layer the delta's own contribution ``op(x, D)`` is added. Memory: the frozen factors take about
``(d_out + d_in') r`` floats per layer (float32; twice a square weight), as in the paper's implementation.
Merging adds ``D`` to the weight (a delta weight; unmerge is bit-exact through the wrapper).

Not in Hugging Face PEFT (peftkit only, ``peft_type`` "SVDIFF"). The paper's code also shifts the 1-D weights
of norm layers and embeddings; here Linear / Conv1D / convolutions are adapted (targeting anything else is an
error naming the module). The paper's "Cut-Mix-Unmix" data augmentation and its single-image editing are
training recipes, not part of the adapter.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from ...kernel_helpers import CONV1D_TYPES, adapter_dtype, is_transposed
from ...layers import Adapter
from ...registry import register_method
from ...targeting import TargetError, all_linear_targets, find_targets, is_target
from ..selective.functional import ReparamOp, weight_op
from . import functional as SF
from .config import SVDiffConfig

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
SUPPORTED: tuple[type, ...] = (nn.Linear, *CONV1D_TYPES, *_CONV)


def spectrum_size(base: nn.Module) -> int:
    """r = min(d_out, d_in'): the number of singular values of the weight as a matrix."""
    w = base.weight
    if is_transposed(base):
        return min(w.shape)
    return min(w.shape[0], w[0].numel())


@register_method(
    "svdiff",
    config=SVDiffConfig,
    category="reparameterized",
    modalities=("generation", "vision", "text", "vision-language"),
    mergeable=True,
    param_formula="min(d_out, d_in k^2) per target (one shift per singular value)",
    position="singular values of each targeted weight",
    paper="arXiv 2303.11305 (SVDiff)",
    examples={"svdiff": {}},
)
class SVDiffAdapter(Adapter):
    supported_layers = SUPPORTED
    default_roles: ClassVar[tuple[str, ...]] = ()
    checkpoint_keys: ClassVar[dict[str, str]] = {"svdiff_delta": "svdiff_delta"}

    def __init__(self, base: nn.Module, config: SVDiffConfig, key: str = "", init: bool = True) -> None:
        super().__init__()
        self.op = weight_op(base)
        if not isinstance(base, SUPPORTED) or self.op is None:
            raise TargetError(
                f"SVDiffConfig.target_modules: {key or 'the layer'} is a {type(base).__name__}; SVDiff shifts the "
                f"singular values of a plain {', '.join(t.__name__ for t in SUPPORTED)} weight")
        w = base.weight
        self.transposed = is_transposed(base)
        self.shape = tuple(w.shape)
        dtype = adapter_dtype(base)  # float32 on half-precision bases
        # U, sigma, V^T: frozen, recomputed from the base on every build (load included), never saved
        u, s, vh = SF.factorize(SF.as_matrix(w, self.transposed), torch.promote_types(dtype, torch.float32))
        self.register_buffer("svdiff_u", u, persistent=False)
        self.register_buffer("svdiff_sigma", s, persistent=False)
        self.register_buffer("svdiff_vh", vh, persistent=False)
        self.svdiff_delta = nn.Parameter(torch.zeros(s.shape[0], device=w.device, dtype=dtype))

    @classmethod
    def select_targets(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: SVDiffConfig) -> list[str]:
        """The config's targets; None: every Linear / Conv1D / convolution but the output embedding and task head."""
        if config.target_modules is not None:
            return find_targets(model, named, config, cls.default_roles, cls.supported_layers)
        linear = all_linear_targets(model, named, getattr(config, "task_type", None))
        names = linear | {p for p, m in named if isinstance(m, _CONV)}
        found = [p for p, m in named if p in names and weight_op(m) is not None and is_target(config, p, names)]
        if not found:
            raise TargetError(f"SVDiff: {type(model).__name__} has no Linear or convolution to adapt")
        return found

    @classmethod
    def param_count(cls, base: nn.Module, config: SVDiffConfig, key: str = "") -> int:
        """Closed form: r = min(d_out, d_in') shifts."""
        return spectrum_size(base)

    def _builder(self) -> SF.SpectralBuilder:
        return SF.SpectralBuilder(self.svdiff_u, self.svdiff_sigma, self.svdiff_vh, self.shape, self.transposed)

    # -- forward ---------------------------------------------------------------------------------------------
    def fused_forward(self, base: nn.Module, x: Tensor) -> Tensor | None:
        """``op(x, W + D, b)`` in one pass (no hooks on the base, which the wrapper would otherwise skip)."""
        if base._forward_hooks or base._forward_pre_hooks:
            return None
        return ReparamOp.apply(x, base.bias, self.op, base.weight, self._builder(), self.svdiff_delta)

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        """``out + op(x, D)``: the spectral delta's own contribution (the op is linear in the weight)."""
        return out + ReparamOp.apply(x, None, self.op, None, self._builder(), self.svdiff_delta).to(out.dtype)

    # -- merge -----------------------------------------------------------------------------------------------
    def delta_weight(self, base: nn.Module) -> Tensor:
        """``U diag(ReLU(sigma + delta) - sigma) V^T`` in the base weight's layout (differentiable in delta)."""
        m = SF.spectral_delta(self.svdiff_u, self.svdiff_sigma, self.svdiff_vh, self.svdiff_delta)
        return SF.from_matrix(m, self.shape, self.transposed).to(base.weight.dtype)

    def extra_repr(self) -> str:
        return f"r={self.svdiff_delta.numel()}, weight={self.shape}"
