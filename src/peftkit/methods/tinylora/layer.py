"""TinyLoRA (arXiv 2602.04118, "Learning to Reason in 13 Parameters").

LoRA-XS's frame with its r x r core replaced by a mixture of fixed random matrices. Each adapted weight
``W`` (d_out x d_in) is split once by a truncated SVD, ``W ~ U_r S_r V_r^T``, into a frozen frame

    A = diag(sqrt S_r) V_r^T  (r x d_in),     B = U_r diag(sqrt S_r)  (d_out x r)

and the update is ``dW = B R A`` with the r x r core

    R = sum_{i=1..u} v_i P_i,     P (u x r x r) fixed, entries N(0, 1/r);   h = W x + B R A x

Only ``v`` (u,) trains; ``A``, ``B`` and ``P`` are frozen. ``weight_tying`` lets consecutive targets share one
``v``: ``g = max(1, round(n (1 - tying)))`` vectors for ``n`` targets, runs of ``n // g`` targets per vector (the
last takes the rest), so ``weight_tying=1`` trains ``u`` numbers for the whole model. Layer ``i`` (its position
among the adapter's targets, in module order) draws ``P`` from ``projection_seed + i``. ``r`` is capped at
``min(d_out, d_in)`` per layer. Linear, GPT-2 Conv1D (laid out as the equivalent Linear) and Embedding
(``W`` = the (num_embeddings x dim) table: the delta rows are ``B[ids] R A``, dropout on ``B[ids]``).
``init_weights=True`` starts ``v`` at 0, so the model starts at the base.

Choices taken from PEFT (its comments note that the paper does not specify P's distribution): ``sqrt S``
goes to both factors, the grouping above; the SVD runs in float32 and ``A``, ``B``, ``P`` are kept in the base weight's dtype,
``v`` in float32 on half-precision bases. File layout as PEFT's: ``<layer>.tinylora_A`` / ``tinylora_B``
(always) and ``<layer>.tinylora_P`` (with ``save_projection``) per layer, and one ``base_model.tinylora_v.<g>``
per vector. The vectors are adapter-level state (``TunerModel.shared_state``, one trained ``nn.Parameter``
per group that every layer of the group references, counted once).

Differences from PEFT: the forward multiplies ``x (R A)^T B^T`` (two GEMMs of width r over the tokens,
accumulated into the base output in place) instead of three products and an add; a load takes ``A`` and ``B``
from the file without computing the SVD first; a file without ``tinylora_P`` while ``save_projection=True``
is refused (PEFT warns and regenerates them); mixing ``save_projection`` values across TinyLoRA adapters is a
``ConfigError`` that is also a ``TypeError`` (PEFT raises ``TypeError``); ``fan_in_fan_out`` follows the
layer type without PEFT's warning; the delta is computed in ``v``'s dtype (float32 on half-precision bases).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import ConfigError
from ...kernel_helpers import CONV1D_TYPES, adapter_dtype, is_transposed
from ...layers import Adapter, SharedState
from ...quant import dequantize_weight
from ...registry import register_method
from . import functional as TF
from .config import TinyLoraConfig

_SUPPORTED = (nn.Linear, *CONV1D_TYPES, nn.Embedding)
_V = "tinylora_v/"  # shared-state name of vector g: "tinylora_v/<g>"; file key "base_model.tinylora_v.<g>"


def _layer_name(path: str) -> str:
    """Shared-state name of a target's (index, group) record."""
    return "layer/" + path.replace(".", "/")


class _VectorKeys(Mapping):
    """``shared_checkpoint_keys`` for a variable number of vectors: ``tinylora_v/<g>`` -> ``tinylora_v.<g>``."""

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.startswith(_V)

    def __getitem__(self, name: str) -> str:
        if name not in self:
            raise KeyError(name)
        return "tinylora_v." + name[len(_V):]

    def __iter__(self) -> Iterator[str]:  # the names depend on the adapter (its number of groups)
        return iter(())

    def __len__(self) -> int:
        return 0


class MixedProjectionSaving(ConfigError, TypeError):
    """TinyLoRA adapters on one model disagree on ``save_projection`` (PEFT raises a TypeError)."""


@register_method(
    "tinylora",
    config=TinyLoraConfig,
    category="reparameterized",
    modalities=("text", "vision", "vision-language", "generation"),
    mergeable=True,
    param_formula="u per group of tied targets (max(1, round(n (1 - weight_tying))) groups); SVD frame and P frozen",
    position="weight delta B (sum_i v_i P_i) A beside each targeted layer; A, B the frozen SVD frame of W",
    paper="arXiv 2602.04118 (TinyLoRA)",
    examples={"tinylora": {"r": 2, "u": 4, "weight_tying": 0.5}},
)
class TinyLoraAdapter(Adapter):
    supported_layers = _SUPPORTED
    default_roles = ("query", "value")  # PEFT's TinyLoRA defaults are its LoRA defaults
    uses_shared_state = True
    shared_checkpoint_keys: ClassVar[Mapping[str, str]] = _VectorKeys()  # type: ignore[assignment]

    def __init__(self, base: nn.Module, config: TinyLoraConfig, key: str = "", init: bool = True,
                 shared: SharedState | None = None) -> None:
        super().__init__()
        if not isinstance(base, _SUPPORTED):
            raise TypeError(f"{key}: TinyLoRA wraps Linear, GPT-2 Conv1D and Embedding layers, not "
                            f"{type(base).__name__} (TinyLoraConfig.target_modules)")
        self.embedding = isinstance(base, nn.Embedding)
        self.transposed = is_transposed(base)
        rows, cols = _natural_shape(base)
        if shared is None:  # a stand-alone adapter (outside a tuner) owns its vector
            shared = SharedState(self.build_shared([(key, base)], config, {}))
        self.__dict__["shared"] = shared  # the tuner's single copy, deliberately not a submodule
        index, group = (int(t) for t in getattr(shared, _layer_name(key)))
        self.tinylora_v = getattr(shared, f"{_V}{group}")  # the group's Parameter (counted and trained once)
        self.r = min(config.r, rows, cols)
        self.save_projection = bool(config.save_projection)
        w = base.weight
        dtype = adapter_dtype(base, keep_half=True)  # the frame and P in the base's dtype (PEFT's files)
        a = torch.zeros(self.r, cols, device=w.device, dtype=dtype)
        b = torch.zeros(rows, self.r, device=w.device, dtype=dtype)
        if init and not w.is_meta:  # a load takes the frame from the file
            a, b = TF.svd_frame(self._natural(base), config.r, dtype)
        self.register_buffer("tinylora_A", a)
        self.register_buffer("tinylora_B", b)
        p = TF.projections(config.u, self.r, config.projection_seed + index)
        self.register_buffer("tinylora_P", p.to(device=w.device, dtype=dtype))
        self.dropout = nn.Dropout(config.tinylora_dropout) if config.tinylora_dropout > 0 else nn.Identity()

    def _natural(self, base: nn.Module) -> Tensor:
        """The base weight as ``W`` (Linear layout; an Embedding's table as it is)."""
        w = base.weight if base.weight.is_floating_point() else dequantize_weight(base)
        return w.t() if self.transposed else w

    @property
    def checkpoint_keys(self) -> dict[str, str]:  # type: ignore[override]
        keys = {"tinylora_A": "tinylora_A", "tinylora_B": "tinylora_B"}
        if self.save_projection:
            keys["tinylora_P"] = "tinylora_P"
        return keys

    @classmethod
    def shared_param_count(cls, targets: list[tuple[str, nn.Module]], config: TinyLoraConfig) -> int:
        """One trained vector of u entries per group of tied targets."""
        return config.u * TF.num_groups(len(targets), config.weight_tying)

    # -- the shared vectors ----------------------------------------------------------------------------------
    @classmethod
    def build_shared(cls, targets: list[tuple[str, nn.Module]], config: TinyLoraConfig,
                     others: dict[str, tuple[Any, dict[str, Tensor]]]) -> dict[str, Tensor]:
        """The adapter's trained vectors ``tinylora_v/<g>`` (u,), each in the dtype of the first target that
        reads it, drawn in group order as PEFT does, and every target's (index, group)."""
        n = len(targets)
        out: dict[str, Tensor] = {}
        for i, (path, base) in enumerate(targets):
            if not isinstance(base, _SUPPORTED):
                raise TypeError(f"{path}: TinyLoRA wraps Linear, GPT-2 Conv1D and Embedding layers, not "
                                f"{type(base).__name__} (TinyLoraConfig.target_modules)")
            g = TF.group_of(i, n, config.weight_tying)
            out[_layer_name(path)] = torch.tensor([i, g])
            name = f"{_V}{g}"
            if name not in out:
                v = torch.empty(config.u, dtype=adapter_dtype(base), device=base.weight.device)
                if config.init_weights is True:
                    nn.init.zeros_(v)
                elif config.init_weights == "uniform":
                    nn.init.uniform_(v, -config.init_v_bound, config.init_v_bound)
                out[name] = nn.Parameter(v)
        return out

    @classmethod
    def check_new_adapter(cls, configs: dict[str, Any], config: Any, adapter_name: str) -> None:
        for name, other in configs.items():
            if isinstance(other, TinyLoraConfig) and other.save_projection != config.save_projection:
                raise MixedProjectionSaving(
                    f"TinyLoraConfig.save_projection: {config.save_projection} differs from adapter {name!r}'s "
                    f"{other.save_projection}; the projections are saved for all TinyLoRA adapters or for none"
                )

    @classmethod
    def param_count(cls, base: nn.Module, config: TinyLoraConfig, key: str = "") -> int:
        """Nothing per target: the trained vectors (``u`` each, one per group) are counted once per adapter."""
        return 0

    # -- forward and merge -----------------------------------------------------------------------------------
    def _frame(self) -> tuple[Tensor, Tensor, Tensor]:
        """``A``, ``B`` in the vector's dtype and ``R`` = sum_i v_i P_i."""
        v = self.tinylora_v
        return (self.tinylora_A.to(v.dtype), self.tinylora_B.to(v.dtype), TF.mix(v, self.tinylora_P))

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        a, b, r_mat = self._frame()
        if self.embedding:  # delta rows B[ids] R A, dropout on B[ids]
            h, up = self.dropout(F.embedding(x, b)), r_mat @ a
        else:  # x A^T first (A frozen: autograd keeps only the (n, r) products, never x), then R, then B
            h, up = F.linear(F.linear(self.dropout(x.to(a.dtype)), a), r_mat), b.t()
        if out.dtype == h.dtype and out.is_contiguous():
            out.view(-1, out.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), up)  # accumulate, no delta tensor
            return out
        return out + (h @ up).to(out.dtype)

    def delta_weight(self, base: nn.Module) -> Tensor:
        """``B R A`` in the base weight's layout ((d_in, d_out) for GPT-2's Conv1D)."""
        a, b, r_mat = self._frame()
        d = TF.delta(a, b, r_mat)
        return d.t() if self.transposed else d


def _natural_shape(base: nn.Module) -> tuple[int, int]:
    """(rows, cols) of ``W``: (d_out, d_in) for Linear / Conv1D, (num_embeddings, dim) for Embedding."""
    if isinstance(base, nn.Embedding):
        return base.num_embeddings, base.embedding_dim
    if isinstance(base, nn.Linear):
        return base.out_features, base.in_features
    rows, cols = base.weight.shape  # GPT-2's Conv1D: (d_in, d_out)
    return cols, rows
