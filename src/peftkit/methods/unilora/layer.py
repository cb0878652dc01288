"""Uni-LoRA (Li et al. 2025, arXiv 2506.00799): "One vector is all you need".

All of a model's LoRA parameters, flattened into one vector ``theta_D`` (D = sum over targets of
r (d_in + d_out)), are the image of one small trained vector ``theta_d`` (d = ``theta_d_length``) under a fixed
sparse projection: ``theta_D = P theta_d``, each row of ``P`` holding a single non-zero entry (which entry of
``theta_d`` that LoRA entry reads), its columns normalised to unit length (``1 / sqrt(n_i)`` for an entry read
``n_i`` times), so that ``P`` is an isometry. Per layer (PEFT's layout):

    A = theta_d[I_A] * S_A  (r, d_in),   B = theta_d[I_B] * S_B  (d_out, r),   h = W0 x + B A x

``I_A``, ``I_B`` (long) and ``S_A``, ``S_B`` (the base weight's dtype) are per-layer buffers: chunks, in module
order and A before B, of one balanced assignment of the ``D`` entries drawn from ``proj_seed`` with numpy (each
index ``floor(D/d)`` or ``ceil(D/d)`` times, as PEFT does; the paper draws uniformly). ``theta_d`` is adapter-level
state: one trained ``nn.Parameter`` per adapter on the tuner, the same object referenced by every layer's
adapter, counted once. It starts uniform in ``[-init_theta_d_bound, init_theta_d_bound]`` (standard normal with
``init_weights=False``); both factors are non-zero, so the method does not start at the base model (as in PEFT).

File layout as PEFT's: ``base_model.unilora_theta_d``; with ``save_indices`` also ``<layer>.unilora_indices_A`` /
``_B`` and ``<layer>.unilora_scales_A`` / ``_B`` (without it they are regenerated from ``proj_seed`` on load).
PEFT also draws (and then discards) ``torch.randint`` indices per layer while injecting; peftkit does not, so
the global random stream after injection differs (the saved and computed tensors do not).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...kernel_helpers import is_transposed, layer_dims
from ...layers import Adapter, SharedState
from ...registry import register_method
from ...targeting import LINEAR_TYPES
from . import functional as UF
from .config import UniLoraConfig


def _offset_name(path: str) -> str:
    return "offset/" + path.replace(".", "/")


@register_method(
    "unilora",
    config=UniLoraConfig,
    category="reparameterized",
    modalities=("text", "vision", "vision-language", "generation"),
    mergeable=True,
    param_formula="theta_d_length per adapter (all targets' factors read from one vector)",
    position="weight delta B A beside each targeted layer; A, B fixed scaled gathers of one trained vector",
    paper="arXiv 2506.00799 (Uni-LoRA)",
    starts_at_base=False,
    examples={"unilora": {"r": 2, "theta_d_length": 16}},
)
class UniLoraAdapter(Adapter):
    supported_layers = LINEAR_TYPES
    default_roles = ("query", "value")  # PEFT's Uni-LoRA defaults are its LoRA defaults
    uses_shared_state = True
    shared_checkpoint_keys: ClassVar[dict[str, str]] = {"unilora_theta_d": "unilora_theta_d"}
    _INDEX_KEYS: ClassVar[dict[str, str]] = {name: name for name in (
        "unilora_indices_A", "unilora_indices_B", "unilora_scales_A", "unilora_scales_B")}

    def __init__(self, base: nn.Module, config: UniLoraConfig, key: str = "", init: bool = True,
                 shared: SharedState | None = None) -> None:
        super().__init__()
        self.d_out, self.d_in = layer_dims(base)
        self.transposed = is_transposed(base)
        if shared is None:  # a stand-alone adapter (outside a tuner) owns its vector
            shared = SharedState(self.build_shared([(key, base)], config, {}))
        self.__dict__["shared"] = shared
        self.unilora_theta_d = shared.unilora_theta_d  # the tuner's one Parameter (counted and trained once)
        self.checkpoint_keys = dict(self._INDEX_KEYS) if config.save_indices else {}
        r = config.r
        start = int(getattr(shared, _offset_name(key)))
        flat = shared.unilora_index
        ia = flat[start:start + r * self.d_in].view(r, self.d_in)
        ib = flat[start + r * self.d_in:start + r * (self.d_in + self.d_out)].view(self.d_out, r)
        inv = shared.unilora_inv_sqrt_counts
        w = base.weight
        self.register_buffer("unilora_indices_A", ia.to(w.device).clone())
        self.register_buffer("unilora_indices_B", ib.to(w.device).clone())
        self.register_buffer("unilora_scales_A", inv[ia].to(device=w.device, dtype=w.dtype))
        self.register_buffer("unilora_scales_B", inv[ib].to(device=w.device, dtype=w.dtype))
        self.dropout = nn.Dropout(config.unilora_dropout) if config.unilora_dropout > 0 else nn.Identity()

    # -- the shared vector and the assignment --------------------------------------------------------------
    @classmethod
    def shared_param_count(cls, targets: list[tuple[str, nn.Module]], config: UniLoraConfig) -> int:
        """The one trained vector ``theta_d`` (theta_d_length,), once per adapter."""
        return config.theta_d_length

    @classmethod
    def build_shared(cls, targets: list[tuple[str, nn.Module]], config: UniLoraConfig,
                     others: dict[str, tuple[Any, dict[str, Tensor]]]) -> dict[str, Tensor]:
        """``theta_d`` (trained), the balanced assignment of all targets' ``D`` entries (in target order, each
        layer's A then B, as PEFT) with its inverse-sqrt counts, and each target's offset into it."""
        sizes = [config.r * sum(layer_dims(base)) for _, base in targets]
        index = UF.balanced_index(sum(sizes), config.theta_d_length, config.proj_seed)
        if config.init_weights:
            theta = torch.empty(config.theta_d_length)
            nn.init.uniform_(theta, -config.init_theta_d_bound, config.init_theta_d_bound)
        else:
            theta = torch.randn(config.theta_d_length)
        device = targets[0][1].weight.device
        out: dict[str, Tensor] = {
            "unilora_theta_d": nn.Parameter(theta.to(device)),
            "unilora_index": index,
            "unilora_inv_sqrt_counts": UF.inverse_sqrt_counts(index, config.theta_d_length),
        }
        start = 0
        for (path, _), size in zip(targets, sizes):
            out[_offset_name(path)] = torch.tensor(start)
            start += size
        return out

    @classmethod
    def param_count(cls, base: nn.Module, config: UniLoraConfig, key: str = "") -> int:
        """Nothing per target: the only trained tensor is ``theta_d`` (``theta_d_length``, once per adapter)."""
        return 0

    # -- forward and merge -----------------------------------------------------------------------------------
    def _factors(self) -> tuple[Tensor, Tensor]:
        """``A`` (r, d_in) and ``B`` (d_out, r)."""
        theta = self.unilora_theta_d.to(self.unilora_indices_A.device)
        return UF.unilora_factors(theta, self.unilora_indices_A, self.unilora_indices_B,
                                  self.unilora_scales_A.to(theta.device), self.unilora_scales_B.to(theta.device))

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        a, b = self._factors()
        x = x.to(self.unilora_theta_d.dtype)
        return out + F.linear(F.linear(self.dropout(x), a), b).to(out.dtype)

    def delta_weight(self, base: nn.Module) -> Tensor:
        """``B A`` in the base weight's layout ((d_in, d_out) for Conv1D)."""
        a, b = self._factors()
        delta = b @ a
        return delta.t() if self.transposed else delta
