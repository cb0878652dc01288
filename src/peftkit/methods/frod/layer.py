"""FRoD (AAAI-26, doi 10.1609/aaai.v40i31.39813): a shared full-rank basis with sparse learnable rotations.

Targets that play the same role in different blocks (a *category*: all ``self_attn.q_proj``, all
``attention.output.dense`` ...) share one frozen full-rank basis ``V`` (d_in x d_in), built from their stacked base
weights ``[W_1; ...; W_n] = Q R`` as ``V = R^T E``, ``E`` the eigenvectors of ``mean_i (Q_i^T Q_i + alpha I)^-1``
(``alpha`` = ``regularization_alpha``; the right singular vectors when the stack is wider than tall). Each layer
then writes its weight ``W`` (d_out x d_in) in that basis, ``W = U diag(lambda) V^T`` with ``U`` (d_out x d_in)
of unit columns, and FRoD *replaces* ``W`` by

    W' = U (S + L) V^T,     L = diag(lambda_l),     h = W' x + b

``S`` (d_in x d_in) is sparse: ``nnz = int(d_in^2 sparse_rate)`` off-diagonal positions (at least one when
``sparse_rate > 0``), one COO pattern per category drawn from ``projection_prng_key``. What trains per layer:
``lambda_l`` (d_in,), starting at the column norms (so ``W' = W`` at init up to the solve's rounding), and the
values of ``S`` (nnz,), starting at 0. Frozen: ``V`` and the patterns (adapter-level, shared by the category's
layers), and ``U`` (per layer, derived from ``V`` and ``W``, never saved). Linear and GPT-2 Conv1D layers.

File layout as PEFT's: per layer ``<layer>.frod_lambda_l`` / ``frod_lambda_s_values``; per category, with
``save_projection``, ``base_model.frod_V.<category>``, ``base_model.frod_s_indices.<category>`` (2, nnz) and
``base_model.frod_s_size.<category>`` ([d_in, d_in]). Categories, layer order, the basis, the pattern draws and
``U`` follow PEFT's arithmetic (``functional.py``), so both libraries build the same tensors from the same model.

Differences from PEFT (numbers and files agree to rounding): the forward skips the base layer as PEFT does
(unless dropout is active: then ``base(x) + (W' - W) dropout(x)``, as PEFT), but instead of PEFT's per-call
coalesced sparse COO product it builds the dense core ``M = S + L`` and, for calls with more tokens than
``d_in + d_out``, ``W' = U M V^T`` once, applied in one GEMM (else ``((x V) M^T) U^T``); a file without the projections while ``save_projection=True`` loads with a warning and the
rebuilt ones (PEFT raises); adapters disagreeing on ``projection_prng_key`` / ``save_projection`` are a
``ConfigError`` (a ``ValueError``, as PEFT's); merging two FRoD adapters on one layer adds ``W'_2 - W'_1`` for the
second (PEFT adds ``W'_2 - W``); unmerge restores the saved weight, as PEFT does; ``progressbar`` and
``runtime_offload_base_weight`` are accepted but change nothing (no progress bar, no offloading); PEFT's
per-category ``V`` sits on CPU, here it follows the model's device.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import ConfigError
from ...kernel_helpers import adapter_dtype, is_transposed, layer_dims
from ...layers import Adapter, SharedState
from ...registry import register_method
from ...targeting import LINEAR_TYPES, NotApplicableError
from . import functional as FF
from .config import FrodConfig

_KINDS = ("frod_V", "frod_s_indices", "frod_s_size")  # shared name "<kind>/<category>"; file "<kind>.<category>"


class _CategoryKeys(Mapping):
    """``shared_checkpoint_keys`` for a model-dependent set of categories: ``<kind>/<c>`` -> ``<kind>.<c>``."""

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.partition("/")[0] in _KINDS and "/" in name

    def __getitem__(self, name: str) -> str:
        if name not in self:
            raise KeyError(name)
        kind, _, category = name.partition("/")
        return f"{kind}.{category}"

    def __iter__(self) -> Iterator[str]:  # the names depend on the model's categories
        return iter(())

    def __len__(self) -> int:
        return 0


def _check_layer(path: str, base: nn.Module) -> None:
    if not isinstance(base, LINEAR_TYPES) or not base.weight.is_floating_point():
        raise TypeError(f"{path}: FRoD wraps Linear and GPT-2 Conv1D layers with a float weight, not "
                        f"{type(base).__name__} (FrodConfig.target_modules)")


def _natural(base: nn.Module) -> Tensor:
    """The base weight as ``W`` (d_out x d_in)."""
    return base.weight.t() if is_transposed(base) else base.weight


@register_method(
    "frod",
    config=FrodConfig,
    category="reparameterized",
    modalities=("text", "vision", "vision-language", "generation"),
    mergeable=True,
    param_formula="d_in + int(d_in^2 sparse_rate) per target (V, U and the sparse pattern frozen)",
    position="weight replaced by U (S + diag(lambda)) V^T; V a full-rank basis shared per module category",
    paper="doi 10.1609/aaai.v40i31.39813 (FRoD, AAAI-26)",
    examples={"frod": {"sparse_rate": 0.05}},
)
class FrodAdapter(Adapter):
    supported_layers = LINEAR_TYPES
    default_roles = ("query", "value")  # PEFT's FRoD table is VeRA's (query and value)
    checkpoint_keys: ClassVar[dict[str, str]] = {"frod_lambda_l": "frod_lambda_l",
                                                 "frod_lambda_s_values": "frod_lambda_s_values"}
    uses_shared_state = True
    shared_checkpoint_keys: ClassVar[Mapping[str, str]] = _CategoryKeys()  # type: ignore[assignment]

    def __init__(self, base: nn.Module, config: FrodConfig, key: str = "", init: bool = True,
                 shared: SharedState | None = None) -> None:
        super().__init__()
        _check_layer(key, base)
        if shared is None:  # a stand-alone adapter (outside a tuner) owns its basis
            shared = SharedState(self.build_shared([(key, base)], config, {}))
        self.__dict__["shared"] = shared  # the tuner's single copy, deliberately not a submodule
        self.category = FF.category_from_key(key)
        self.transposed = is_transposed(base)
        self.d_out, self.d_in = layer_dims(base)
        w = base.weight
        dtype = adapter_dtype(base)  # float32 on half-precision bases (PEFT's autocast_adapter_dtype)
        v = self._shared("frod_V")
        nnz = self._shared("frod_s_indices").shape[1]
        self.frod_lambda_s_values = nn.Parameter(torch.zeros(nnz, device=w.device, dtype=dtype))
        if w.is_meta:  # a model without weights (parameter counts): shapes only
            u, lam = torch.empty(self.d_out, self.d_in, device="meta"), torch.empty(self.d_in, device="meta")
        else:
            u, lam = FF.u_and_lambda(v.to(w.dtype), _natural(base))
        self.frod_lambda_l = nn.Parameter(lam.to(device=w.device, dtype=dtype))
        if init and not config.init_weights:  # off the base (tests), PEFT's draws in PEFT's order
            with torch.no_grad():
                nn.init.normal_(self.frod_lambda_s_values, std=0.1)
                self.frod_lambda_l.add_(torch.randn_like(self.frod_lambda_l) * 0.1)
        # frozen, derived from V and W, never saved (PEFT's non-persistent frod_U), in the base's dtype
        self.register_buffer("frod_U", u.to(device=w.device, dtype=adapter_dtype(base, keep_half=True)),
                             persistent=False)
        self.dropout = nn.Dropout(config.frod_dropout) if config.frod_dropout > 0 else nn.Identity()

    def _shared(self, kind: str) -> Tensor:
        return getattr(self.shared, f"{kind}/{self.category}")

    # -- the shared bases ------------------------------------------------------------------------------------
    @classmethod
    def build_shared(cls, targets: list[tuple[str, nn.Module]], config: FrodConfig,
                     others: dict[str, tuple[Any, dict[str, Tensor]]]) -> dict[str, Tensor]:
        """Per category: the basis ``V`` (from the category's weights in block order, PEFT's
        ``_init_frod_projections``), the COO pattern of ``S`` and its size; patterns drawn in sorted category
        order from one generator seeded with ``projection_prng_key``."""
        for path, base in targets:
            _check_layer(path, base)
        weights: dict[int, dict[str, nn.Module]] = {}
        for fallback, (path, base) in enumerate(targets):
            weights.setdefault(FF.layer_index_from_key(path, fallback), {})[FF.category_from_key(path)] = base
        generator = torch.Generator(device="cpu").manual_seed(config.projection_prng_key)
        out: dict[str, Tensor] = {}
        for category in sorted({c for layer in weights.values() for c in layer}):
            bases = [layer[category] for _, layer in sorted(weights.items()) if category in layer]
            dims = {layer_dims(b)[1] for b in bases}
            if len(dims) > 1:
                # PEFT fails in torch.cat here; the model has no category FRoD can share a basis across
                raise NotApplicableError(
                    f"FrodConfig.target_modules: the {category!r} layers have different input sizes {sorted(dims)}; "
                    "FRoD shares one square basis per module category, so targets of one category need one d_in")
            first = bases[0].weight
            if first.is_meta:  # a model without weights (parameter counts): the basis's shape only
                d = dims.pop()
                v = torch.empty(d, d, device="meta")
            else:
                matrices = [_natural(b).detach().to(torch.float32).cpu() for b in bases]
                v = FF.projection_from_weights(matrices, config.regularization_alpha)
            out[f"frod_V/{category}"] = v.to(dtype=first.dtype).to(first.device)
            d_in = v.shape[0]
            out[f"frod_s_indices/{category}"] = FF.sparse_pattern(d_in, config.sparse_rate, generator).to(first.device)
            out[f"frod_s_size/{category}"] = torch.tensor([d_in, d_in], dtype=torch.long, device=first.device)
        return out

    @classmethod
    def saves_shared(cls, config: FrodConfig) -> bool:
        return config.save_projection

    @classmethod
    def check_new_adapter(cls, configs: dict[str, Any], config: Any, adapter_name: str) -> None:
        for name, other in configs.items():
            if not isinstance(other, FrodConfig):
                continue
            for field in ("projection_prng_key", "save_projection", "runtime_offload_base_weight"):
                if getattr(other, field) != getattr(config, field):
                    raise ConfigError(f"FrodConfig.{field}: {getattr(config, field)!r} differs from adapter "
                                      f"{name!r}'s {getattr(other, field)!r}; all FRoD adapters on a model share it "
                                      "(as in PEFT)")

    @classmethod
    def param_count(cls, base: nn.Module, config: FrodConfig, key: str = "") -> int:
        """Closed form: ``lambda_l`` (d_in) and the sparse values (``nnz``) per target."""
        d_in = layer_dims(base)[1]
        return d_in + FF.nnz_of(d_in, config.sparse_rate)

    # -- forward and merge -----------------------------------------------------------------------------------
    def _core(self) -> Tensor:
        idx = self._shared("frod_s_indices").to(self.frod_lambda_l.device)
        return FF.core(idx, self.frod_lambda_s_values, self.frod_lambda_l)

    def _factors(self) -> tuple[Tensor, Tensor, Tensor]:
        dt = self.frod_lambda_l.dtype
        return self.frod_U.to(dt), self._core(), self._shared("frod_V").to(dt)

    def adapted_weight(self) -> Tensor:
        """``W' = U (S + L) V^T`` (d_out x d_in), in the adapter's dtype."""
        return FF.adapted_weight(*self._factors())

    def _apply_frod(self, h: Tensor, bias: Tensor | None) -> Tensor:
        """``h W'^T + bias``: with more tokens than ``d_in + d_out``, ``W' = U (M V^T)`` is built once and applied
        in one GEMM (fewer flops and far faster than PEFT's ``h V``, sparse COO product, ``U^T`` chain; its
        backward needs no per-token sparse work); with fewer, ``((h V) M^T) U^T`` (``M = S + L`` dense, rebuilt in
        backward rather than kept: ``FF.CoreLinear``)."""
        dt = self.frod_lambda_l.dtype
        u, v = self.frod_U.to(dt), self._shared("frod_V").to(dt)
        if h.numel() // max(self.d_in, 1) > self.d_in + self.d_out:
            return F.linear(h, FF.adapted_weight(u, self._core(), v), bias)
        idx = self._shared("frod_s_indices").to(self.frod_lambda_l.device)
        return F.linear(FF.CoreLinear.apply(h @ v, idx, self.frod_lambda_s_values, self.frod_lambda_l), u, bias)

    def fused_forward(self, base: nn.Module, x: Tensor) -> Tensor | None:
        if self.dropout.training and isinstance(self.dropout, nn.Dropout):
            return None  # PEFT: base(x) + (W' - W) dropout(x)
        dt = self.frod_lambda_l.dtype
        bias = None if base.bias is None else base.bias.to(dt)
        return self._apply_frod(x.to(dt), bias).to(x.dtype)

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        dt = self.frod_lambda_l.dtype
        h = self.dropout(x.to(dt))
        delta = self._apply_frod(h, None) - F.linear(h, _natural(base).detach().to(dt))
        return out + delta.to(out.dtype)

    def delta_weight(self, base: nn.Module) -> Tensor:
        """``W' - W`` in the base weight's layout ((d_in, d_out) for Conv1D)."""
        d = self.adapted_weight() - _natural(base).detach().to(self.frod_lambda_l.dtype)
        return d.t() if self.transposed else d

    def merge(self, base: nn.Module, weight: Tensor) -> tuple[Tensor, Any]:
        """``weight + (W' - weight)`` (PEFT's in-place add), keeping ``weight`` for a bit-exact unmerge."""
        w = weight.t() if self.transposed else weight
        d = self.adapted_weight() - w.to(self.frod_lambda_l.dtype)
        return weight + (d.t() if self.transposed else d).to(weight.dtype), weight.clone()

    def unmerge(self, base: nn.Module, weight: Tensor, state: Any) -> Tensor:
        return state.to(weight.dtype).clone()
