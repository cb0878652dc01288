"""OFT and BOFT adapters on Linear, GPT-2 Conv1D and Conv2d layers (OFT also on Embedding).

Both fine-tune a layer by rotating its input space with an orthogonal ``R`` (n x n, n the input width;
c_in k_h k_w for a convolution, whose kernel is flattened as in the paper):

- OFT (Qiu et al. 2023, arXiv 2306.07280): ``h = W R^T x``, ``R = diag(R_1 .. R_D)`` with Cayley blocks
  ``R_k = (I - Q_k)(I + Q_k)^-1`` of skew-symmetric ``Q_k`` (or its Neumann series, PEFT's default).
  ``Q = 0`` at init, so the model starts at the base. COFT keeps ``||Q_k||_F <= eps / sqrt(D)`` by
  projecting the parameters after each update (projected gradient descent, as PEFT). On an Embedding
  the output vectors are rotated: ``E' = E R``.
- BOFT (Liu et al. 2024, arXiv 2311.06243): ``h = s * (W R^T x) + bias`` with ``R`` a product of ``m``
  butterfly factors ``P_i diag(R_i1 .. R_iD) P_i^T`` and ``s`` a learned per-output scale.

Parameters, shapes and file keys follow Hugging Face PEFT (``oft_R.weight`` / ``oft_embedding_R.weight``
(D, b (b - 1) / 2); ``boft_R`` (m, D, b, b) and ``boft_s`` (d_out, 1), (1, d_out) on Conv2d), so adapter
files load both ways. No dense ``n x n`` rotation is formed: see ``functional`` and ``kernels``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...layers import Adapter
from ...kernel_helpers import CONV1D_TYPES, adapter_dtype, has_hooks, is_transposed, layer_dims
from ...quant import dequantize_weight
from ...registry import register_method
from ...targeting import LINEAR_TYPES as _LINEAR
from ..lora.kernels import ScaleShift
from . import functional as OF
from .config import BOFTConfig, OFTConfig
from .kernels import RotatedLinear

_MODALITIES = ("text", "vision", "vision-language", "generation")
_DEFECT_TOLERANCE = 0.5  # max |R R^T - I| above which an unmerge by inversion is not trusted
# training on fewer tokens than this rotates the weight even when the input is smaller: a few tokens make
# either side cheap, and the weight side rounds exactly as the merged layer (W R^T) does, which matters
# for blocks far from orthogonal (a large Neumann-series R amplifies the difference of the two orders)
MIN_INPUT_ROWS = 64


def _geometry(base: nn.Module, key: str) -> tuple[str, int, int, str]:
    """(kind, rotated width n, d_out, how n arises) of a supported base layer."""
    if isinstance(base, nn.Embedding):
        return "embedding", base.embedding_dim, base.embedding_dim, f"embedding_dim = {base.embedding_dim}"
    if isinstance(base, nn.Conv2d):
        if base.groups != 1:
            raise ValueError(f"{key}: orthogonal fine-tuning of grouped convolutions (groups={base.groups}) "
                             "is not supported")
        kh, kw = base.kernel_size
        n = base.in_channels * kh * kw
        return "conv", n, base.out_channels, f"c_in * k_h * k_w = {base.in_channels} * {kh} * {kw} = {n}"
    if isinstance(base, _LINEAR):
        d_out, d_in = layer_dims(base)
        return "linear", d_in, d_out, f"in_features = {d_in}"
    raise TypeError(f"{key}: OFT / BOFT wrap Linear, Conv1D and Conv2d layers, not {type(base).__name__}")


def oft_blocks(config: OFTConfig, width: int, key: str = "", what: str = "") -> tuple[int, int]:
    """(D, b) for OFT on a layer of input width ``width``: ``b = oft_block_size`` or ``width / r``."""
    what = what or f"width {width}"
    if config.oft_block_size:
        b = config.oft_block_size
        if width % b:
            raise ValueError(f"{key}: OFTConfig.oft_block_size={b} must divide the layer's input width "
                             f"({what}); pick a divisor of {width} or set r instead")
        d = width // b
    else:
        d = config.r
        if width % d:
            raise ValueError(f"{key}: OFTConfig.r={d} (number of blocks) must divide the layer's input width "
                             f"({what}); pick a divisor of {width} or set oft_block_size instead")
        b = width // d
        if b < 2:
            raise ValueError(f"{key}: OFTConfig.r={d} leaves blocks of size {b} on the layer's input width "
                             f"({what}); a 1 x 1 rotation has no parameters, use r <= {width // 2}")
    return d, b


def boft_blocks(config: BOFTConfig, width: int, key: str = "", what: str = "") -> tuple[int, int]:
    """(D, b) for BOFT on a layer of input width ``width`` (PEFT's constraints on butterflies)."""
    what = what or f"width {width}"
    extra = config.boft_n_butterfly_factor - 1  # the paper's butterfly count beyond plain OFT
    if config.boft_block_num:
        d = config.boft_block_num
        if width % d:
            raise ValueError(f"{key}: BOFTConfig.boft_block_num={d} must divide the layer's input width ({what})")
        if extra and (2**extra > d or d % 2**extra):
            raise ValueError(f"{key}: BOFTConfig.boft_block_num={d} must be a multiple of "
                             f"2^(boft_n_butterfly_factor - 1) = {2**extra} (layer input width: {what})")
        b = width // d
    else:
        b = config.boft_block_size
        if width % b:
            raise ValueError(f"{key}: BOFTConfig.boft_block_size={b} must divide the layer's input width ({what})")
        if extra and width % (b * 2**extra):
            raise ValueError(f"{key}: BOFTConfig.boft_block_size={b} times 2^(boft_n_butterfly_factor - 1) = "
                             f"{b * 2**extra} must divide the layer's input width ({what})")
        d = width // b
    if extra and (d % 2 or b % 2):
        raise ValueError(f"{key}: BOFT butterflies need an even block size and block count, got {d} blocks of "
                         f"size {b} on the layer's input width ({what})")
    return d, b


class _RotationAdapter(Adapter):
    """Shared mechanics: the input rotation in forward (weight-side kernel), merge and unmerge.

    Subclasses provide ``_blocks(dropout)`` -> (m, D, b, b) rotation blocks, ``perms`` and ``_scale()``.
    """

    default_roles = ("query", "value")  # PEFT's OFT / BOFT defaults are its LoRA defaults
    orthogonal = True  # whether the blocks are exactly orthogonal (unmerge by transpose)

    def _setup(self, base: nn.Module, key: str) -> None:
        self.kind, self.width, self.d_out, self._what = _geometry(base, key)
        self.transposed = is_transposed(base)
        w = base.weight
        self._dtype = adapter_dtype(base)  # fp32 on half-precision / quantized bases
        self._device = w.device

    @property
    def perms(self) -> list[OF.Perm | None]:
        """Each factor's (permutation, inverse), None for the identity."""
        return [None]

    def _scale(self) -> Tensor | None:
        return None

    def _blocks(self, dropout: bool = True) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _forward_blocks(self) -> Tensor:
        """``_blocks()`` for a forward pass, kept between calls while nothing can change them: eval mode and
        no gradient wanted for the adapter. Keyed on the parameters' storage and version (an in-place update
        or a load recomputes) and on the grad / inference mode (an inference tensor must not reach autograd)."""
        params = [p for p in self._parameters.values() if p is not None]
        grad = torch.is_grad_enabled()
        if self.training or (grad and any(p.requires_grad for p in params)):
            return self._blocks()
        key = (grad, torch.is_inference_mode_enabled(), *((p.data_ptr(), p._version) for p in params))
        cached = self.__dict__.get("_blocks_cache")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_blocks_cache"] = (key, self._blocks())
        return cached[1]

    def train(self, mode: bool = True) -> "_RotationAdapter":
        self.__dict__.pop("_blocks_cache", None)
        return super().train(mode)

    # -- forward ---------------------------------------------------------------------------------------
    def _matrix(self, weight: Tensor) -> Tensor:
        """A base weight as the (rows, n) matrix whose rows the rotation acts on (a view)."""
        if self.kind == "conv":
            return weight.reshape(weight.shape[0], -1)
        return weight.t() if self.transposed else weight

    def _rotated_conv_weight(self, base: nn.Module) -> Tensor:
        blocks, scale = self._forward_blocks(), self._scale()
        w = self._matrix(base.weight).to(blocks.dtype)
        w = OF.butterfly_apply(w, blocks, self.perms, transpose=True)
        if scale is not None:
            w = w * scale[:, None]
        return w.view_as(base.weight)

    def fused_forward(self, base: nn.Module, x: Tensor) -> Tensor | None:
        """Base and rotation in one pass (the base output is never computed separately)."""
        if has_hooks(base) or self.kind == "embedding":
            return None
        w = base.weight
        if self.kind == "conv":
            rotated = self._rotated_conv_weight(base)
            bias = None if base.bias is None else base.bias.to(rotated.dtype)
            return base._conv_forward(x.to(rotated.dtype), rotated, bias).to(x.dtype)
        if x.dtype != w.dtype or self._dtype != w.dtype or torch.is_autocast_enabled(x.device.type):
            return None  # under autocast the generic path lets autocast pick each op's dtype
        blocks, scale = self._forward_blocks(), self._scale()
        x2d = x.reshape(-1, self.width)
        w = self._matrix(w)
        bias = base.bias if scale is None else None
        # rotate x or W, whichever has fewer rows; with autograd on, W below MIN_INPUT_ROWS tokens
        rows = x2d.shape[0]
        rotate_input = rows < self.d_out and (rows >= MIN_INPUT_ROWS or not torch.is_grad_enabled())
        out = RotatedLinear.apply(x2d, w, bias, blocks, self.perms, rotate_input)
        if scale is not None:
            out = ScaleShift.apply(out, scale, base.bias)
        return out.view(*x.shape[:-1], self.d_out)

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        """The adapter given the running output: the change ``base(x R) - base(x)`` is added to ``out``
        (on an Embedding, the running output is rotated)."""
        blocks = self._forward_blocks()
        if self.kind == "embedding":
            flat = out.reshape(-1, self.width).to(blocks.dtype)
            return OF.butterfly_apply(flat, blocks, self.perms).view(out.shape).to(out.dtype)
        if self.kind == "conv":
            delta = self._rotated_conv_weight(base) - base.weight.to(blocks.dtype)
            return out + base._conv_forward(x.to(delta.dtype), delta, None).to(out.dtype)
        scale = self._scale()
        x2d = x.reshape(-1, self.width).to(blocks.dtype)
        w = base.weight if base.weight.is_floating_point() else dequantize_weight(base)  # a 4-/8-bit base
        w = self._matrix(w).to(blocks.dtype)
        z = F.linear(OF.butterfly_apply(x2d, blocks, self.perms), w)
        if scale is not None:
            z = z * scale
        return out + (z - F.linear(x2d, w)).view(out.shape).to(out.dtype)

    def forward_around(self, base: nn.Module, x: Tensor, inner: Any) -> Tensor:
        """Nested as in peft's mixed model: the rotation acts on the layer's input, so ``inner`` (the base with
        the adapters nested inside this one) runs on ``x R``; on an Embedding the output is rotated (the default)."""
        if self.kind == "embedding":
            return super().forward_around(base, x, inner)
        if self.kind == "conv" or self._scale() is not None:
            raise NotImplementedError(f"{type(self).__name__}: nesting other adapters inside a rotation is "
                                      "implemented for Linear layers without BOFT's scale only")
        blocks = self._forward_blocks()
        rotated = OF.butterfly_apply(x.reshape(-1, self.width).to(blocks.dtype), blocks, self.perms)
        return inner(rotated.view(x.shape).to(x.dtype))

    # -- merge -----------------------------------------------------------------------------------------
    def _to_layout(self, matrix: Tensor, weight: Tensor) -> Tensor:
        if self.kind == "conv":
            return matrix.reshape(weight.shape)
        return (matrix.t() if self.transposed else matrix).contiguous()

    def _rotate(self, weight: Tensor, blocks: Tensor) -> Tensor:
        """``W R^T`` (rows scaled by BOFT's ``s``); an Embedding's ``E R``; in ``weight``'s layout and dtype."""
        scale = self._scale()
        w = self._matrix(weight).to(blocks.dtype)
        if self.kind == "embedding":
            merged = OF.butterfly_apply(w, blocks, self.perms)
        else:
            merged = OF.butterfly_apply(w, blocks, self.perms, transpose=True)
            if scale is not None:
                merged = merged * scale[:, None]
        return self._to_layout(merged, weight).to(weight.dtype)

    def merge(self, base: nn.Module, weight: Tensor) -> tuple[Tensor, Any]:
        """``W R^T`` (rows scaled by BOFT's ``s``); an Embedding's ``E R``."""
        blocks = self._blocks(dropout=False)
        # Neumann-series blocks far from orthogonal are ill-conditioned: inverting them would amplify the
        # merge's rounding, so the original weight is kept to undo the merge (never so after real training)
        keep = not self.orthogonal and OF.orthogonality_defect(blocks) > _DEFECT_TOLERANCE
        return self._rotate(weight, blocks), weight.clone() if keep else None

    def effective_param(self, base: nn.Module, name: str, value: Tensor) -> Tensor:
        """The rotated weight as the forward computes it (training dropout included), without merge's
        conditioning check (a host sync); for a caller that reads the weight instead of calling the layer
        (``nn.MultiheadAttention``'s out_proj, see ``peftkit.mha``)."""
        return self._rotate(value, self._forward_blocks())

    def unmerge(self, base: nn.Module, weight: Tensor, state: Any) -> Tensor:
        """The inverse of :meth:`merge`: ``R`` undoes ``R^T`` when ``R`` is exactly orthogonal (Cayley);
        the Neumann-series blocks are inverted explicitly (or, far from orthogonal, the kept original is
        returned). A zero scale cannot be undone (the wrapper's exact-restore record covers those entries)."""
        if state is not None:
            return state.clone()
        blocks, scale = self._blocks(dropout=False), self._scale()
        w = self._matrix(weight).to(blocks.dtype)
        if scale is not None:
            w = torch.where(scale[:, None] == 0, torch.zeros_like(w), w / scale[:, None])
        if self.orthogonal:  # R^-1 = R^T: W = (W R^T) R, E = (E R) R^T
            restored = OF.butterfly_apply(w, blocks, self.perms, transpose=self.kind == "embedding")
        else:  # OFT's Neumann blocks (one factor): W = (W R^T) R^-T, E = (E R) R^-1
            restored = OF.block_apply(w, OF.block_inverse(blocks[0]), transpose=self.kind != "embedding")
        return self._to_layout(restored, weight).to(weight.dtype)


@register_method(
    "oft",
    config=OFTConfig,
    category="reparameterized",
    modalities=_MODALITIES,
    mergeable=True,
    param_formula="(n / b) b (b - 1) / 2 per target (n input width, b oft_block_size; b (b - 1) / 2 with block_share)",
    position="orthogonal rotation of each targeted layer's input space (multiplies the weight)",
    paper="arXiv 2306.07280 (OFT / COFT)",
    examples={
        "oft": {"r": 1, "oft_block_size": 0},
        "coft": {"r": 1, "oft_block_size": 0, "coft": True, "eps": 1e-2, "use_cayley_neumann": False},
    },
)
class OFTAdapter(_RotationAdapter):
    """``R = diag(cayley(Q_1) .. cayley(Q_D))`` from ``oft_R`` (D, b (b - 1) / 2); D = 1 with block_share."""

    supported_layers = (nn.Linear, nn.Conv2d, nn.Embedding) + CONV1D_TYPES

    def __init__(self, base: nn.Module, config: OFTConfig, key: str = "", init: bool = True) -> None:
        super().__init__()
        self._setup(base, key)
        self.num_blocks, self.block_size = oft_blocks(config, self.width, key, self._what)
        b = self.block_size
        self.neumann_terms = config.num_cayley_neumann_terms if config.use_cayley_neumann else None
        self.orthogonal = self.neumann_terms is None
        self.coft, self.eps = bool(config.coft), float(config.eps)
        self.dropout = float(config.module_dropout)
        stored = 1 if config.block_share else self.num_blocks
        self.oft_R = nn.Parameter(torch.zeros(stored, b * (b - 1) // 2, device=self._device, dtype=self._dtype))
        if init and not config.init_weights:
            with torch.no_grad():
                nn.init.normal_(self.oft_R, mean=0.0, std=0.1)

    @property
    def checkpoint_keys(self) -> dict[str, str]:  # type: ignore[override]
        return {"oft_R": "oft_embedding_R.weight" if self.kind == "embedding" else "oft_R.weight"}

    @classmethod
    def param_count(cls, base: nn.Module, config: OFTConfig, key: str = "") -> int:
        """Closed form: D b (b - 1) / 2 (b (b - 1) / 2 with block_share), D b = input width."""
        _, width, _, what = _geometry(base, key)
        d, b = oft_blocks(config, width, key, what)
        return (1 if config.block_share else d) * b * (b - 1) // 2

    def _skew_params(self) -> Tensor:
        """``oft_R``, projected onto COFT's ball when constrained. In training the parameter itself is
        projected (projected gradient descent, as PEFT); otherwise the projection is applied on the fly."""
        vec = self.oft_R
        if not self.coft:
            return vec
        if not self.training:
            return OF.coft_project(vec, self.eps)
        with torch.no_grad():
            projected = OF.coft_project(vec, self.eps)
            if not torch.equal(projected, vec):
                vec.copy_(projected)
        return vec

    def _blocks(self, dropout: bool = True) -> Tensor:
        rot = OF.cayley(OF.skew_symmetric(self._skew_params(), self.block_size), self.neumann_terms).unsqueeze(0)
        if dropout and self.training and self.dropout > 0:
            rot = OF.identity_dropout(rot, self.dropout)
        return rot


@register_method(
    "boft",
    config=BOFTConfig,
    category="reparameterized",
    modalities=_MODALITIES,
    mergeable=True,
    param_formula="m n b + d_out per target (m butterfly factors, n input width, b boft_block_size)",
    position="butterfly-orthogonal rotation of each targeted layer's input space, scaled outputs",
    paper="arXiv 2311.06243 (BOFT)",
    examples={"boft": {"boft_block_num": 1, "boft_block_size": 0}},
)
class BOFTAdapter(_RotationAdapter):
    """``R = prod_i P_i diag(cayley(R_i1) .. cayley(R_iD)) P_i^T`` from ``boft_R`` (m, D, b, b), scale ``boft_s``."""

    supported_layers = (nn.Linear, nn.Conv2d) + CONV1D_TYPES
    checkpoint_keys = {"boft_R": "boft_R", "boft_s": "boft_s"}  # noqa: RUF012

    def __init__(self, base: nn.Module, config: BOFTConfig, key: str = "", init: bool = True) -> None:
        super().__init__()
        self._setup(base, key)
        if self.kind == "embedding":  # pragma: no cover - not in supported_layers
            raise TypeError(f"{key}: BOFT does not wrap Embedding layers")
        d, b = boft_blocks(config, self.width, key, self._what)
        m = config.boft_n_butterfly_factor
        self.num_blocks, self.block_size, self.factors = d, b, m
        self.dropout = float(config.boft_dropout)
        self._permuted = []
        for i, perm in enumerate(OF.butterfly_permutations(self.width, d, b, m)):
            self._permuted.append(perm is not None)
            if perm is not None:  # index buffers: follow the device, never saved
                self.register_buffer(f"_perm{i}", perm[0].to(self._device), persistent=False)
                self.register_buffer(f"_inv{i}", perm[1].to(self._device), persistent=False)
        s_shape = (1, self.d_out) if self.kind == "conv" else (self.d_out, 1)
        self.boft_R = nn.Parameter(torch.zeros(m, d, b, b, device=self._device, dtype=self._dtype))
        self.boft_s = nn.Parameter(torch.ones(s_shape, device=self._device, dtype=self._dtype))
        if init and not config.init_weights:
            with torch.no_grad():
                nn.init.normal_(self.boft_R, mean=0.0, std=0.1)
                nn.init.normal_(self.boft_s, mean=1.0, std=0.1)

    @classmethod
    def param_count(cls, base: nn.Module, config: BOFTConfig, key: str = "") -> int:
        """Closed form: m D b^2 + d_out, D b = input width."""
        _, width, d_out, what = _geometry(base, key)
        d, b = boft_blocks(config, width, key, what)
        return config.boft_n_butterfly_factor * d * b * b + d_out

    @property
    def perms(self) -> list[OF.Perm | None]:
        return [(getattr(self, f"_perm{i}"), getattr(self, f"_inv{i}")) if p else None
                for i, p in enumerate(self._permuted)]

    def _scale(self) -> Tensor:
        return self.boft_s.reshape(-1)

    def _blocks(self, dropout: bool = True) -> Tensor:
        m, d, b, _ = self.boft_R.shape
        rot = OF.cayley_full(self.boft_R.reshape(m * d, b, b)).view(m, d, b, b)
        if dropout and self.training and self.dropout > 0:
            rot = OF.identity_dropout(rot, self.dropout)
        return rot
