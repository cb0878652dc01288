"""Compacter and Compacter++ (Mahabadi et al. 2021, "Compacter: Efficient Low-Rank Hypercomplex Adapter
Layers", arXiv 2106.04647): a bottleneck adapter whose two projections are PHM layers

    W = sum_{i=1..n} A_i ⊗ B_i,        B_i = s_i t_i^T (rank 1),

W (d_out, d_in), A_i (n, n) "slow" rule matrices shared by every PHM layer of the adapter (down and up
projections of every layer, as in AdapterHub's ``shared_phm_rule``), s_i (d_out/n,), t_i (d_in/n,) per layer.
Then, as for the Houlsby adapter, ``h <- h + W_up f(W_down h + b_d) + b_u`` with m = d / reduction_factor
(AdapterHub: n = 4, reduction 32, GELU). Compacter sits after the attention output and the FFN output;
Compacter++ only after the FFN output. AdapterHub's Compacter++ takes its placement from the Pfeiffer adapter
(``original_ln_before=True``); the option is the bottleneck adapter's, off by default here.

AdapterHub's PHM layer computes ``x H`` with ``H = sum_i kron(C_i, W_i)`` (d_in, d_out), ``W_i = l_i r_i``
(``W_left`` (n, d_in/n, 1), ``W_right`` (n, 1, d_out/n)): the same weight as here with ``A_i = C_i^T``,
``s_i = r_i``, ``t_i = l_i`` (tests/methods/test_adapterhub_parity.py maps the keys).

Parameters per adapter: down (d + m) + m, up (m + d) + d, i.e. 3(d + m); plus n^3 once for the shared
rule. n must divide d and m. (AdapterHub 1.3.0 counts the same on RoBERTa-base: 57,088 / 28,576.)

Shared rules: the A_i are *trained*, so they are parameters of one adapter (the first targeted layer, named in
``shared_owner`` and saved under its key ``phm_rule``) that every other layer of the
same adapter uses by reference. The engine's ``uses_shared_state`` mechanism holds frozen buffers (VeRA's
random projections), which would freeze the rules, so it is not used here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import check_int
from ...registry import register_method
from ...targeting import TargetError
from .bottleneck import ACTIVATIONS, BottleneckAdapter, BottleneckConfig, _piece, adapter_factory

# rule matrices built by the owner layer of an injection, for the other layers of it, by config id
_RULES: dict[int, nn.Parameter] = {}


@dataclasses.dataclass
class CompacterConfig(BottleneckConfig):
    """Compacter: a Houlsby-placed adapter with PHM projections (see the module doc).

    Args (besides the bottleneck adapter's, always in sequence):
        phm_dim: n, the number of Kronecker terms and the size of each shared rule A_i (n, n).
        shared_owner: path of the layer holding the shared rules; filled at injection.
    """

    PEFT_TYPE: ClassVar[str] = "COMPACTER"

    positions: list[str] = dataclasses.field(default_factory=lambda: ["attention_output", "ffn_output"])
    bottleneck_size: int | None = None
    reduction_factor: float | None = 32.0
    non_linearity: str = "gelu"
    phm_dim: int = 4
    shared_owner: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check(self.mode == "sequential", "mode", '"sequential" (Compacter sits after its sublayer)')
        check_int(self, "phm_dim", 1, expected="a positive int")


@dataclasses.dataclass
class CompacterPlusPlusConfig(CompacterConfig):
    """Compacter++: Compacter after the FFN output only."""

    PEFT_TYPE: ClassVar[str] = "COMPACTER_PP"

    positions: list[str] = dataclasses.field(default_factory=lambda: ["ffn_output"])


def phm_weight(rule: Tensor, s: Tensor, t: Tensor) -> Tensor:
    """``sum_i A_i ⊗ (s_i t_i^T)``: rule (n, n, n), s (n, d_out/n), t (n, d_in/n) -> (d_out, d_in)."""
    n = rule.shape[0]
    b = s.unsqueeze(2) * t.unsqueeze(1)  # (n, d_out/n, d_in/n)
    # kron(A_i, B_i)[(a, p), (c, q)] = A_i[a, c] B_i[p, q]
    w = torch.einsum("iac,ipq->apcq", rule, b)
    return w.reshape(n * s.shape[1], n * t.shape[1])


class CompacterAdapter(BottleneckAdapter):
    """``h + s (W_up f(W_down h + b_d) + b_u)`` with PHM weights (see the module doc)."""

    checkpoint_keys: ClassVar[dict[str, str]] = {
        "down_s": "phm_down.s", "down_t": "phm_down.t", "down_bias": "phm_down.bias",
        "up_s": "phm_up.s", "up_t": "phm_up.t", "up_bias": "phm_up.bias",
    }

    def __init__(self, base: nn.Module, config: CompacterConfig, key: str = "", init: bool = True) -> None:
        nn.Module.__init__(self)
        self.piece = _piece(config, key)  # "seq", or "ln" with original_ln_before
        self.scaling, self.residual, self.act = config.scaling, config.residual, config.non_linearity
        self.dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        d, _ = self.dims(base, config, key)
        m, n = config.size(d), config.phm_dim
        kw = adapter_factory(base)
        self.down_s = nn.Parameter(torch.empty(n, m // n, **kw))  # W_down (m, d)
        self.down_t = nn.Parameter(torch.empty(n, d // n, **kw))
        self.down_bias = nn.Parameter(torch.zeros(m, **kw))
        self.up_s = nn.Parameter(torch.empty(n, d // n, **kw))  # W_up (d, m)
        self.up_t = nn.Parameter(torch.empty(n, m // n, **kw))
        self.up_bias = nn.Parameter(torch.zeros(d, **kw))
        if key == config.shared_owner:
            self.phm_rule = nn.Parameter(torch.empty(n, n, n, **kw))  # A_i (n, n), shared by every PHM layer
            _RULES[id(config)] = self.phm_rule
            self.checkpoint_keys = {**type(self).checkpoint_keys, "phm_rule": "phm_rule"}
        elif id(config) not in _RULES:
            raise TargetError(f"{key}: the layer holding Compacter's shared rules ({config.shared_owner!r}) "
                              "was not built first")
        self.rules = [_RULES[id(config)]]  # a plain list: the owner alone registers it
        with torch.no_grad():
            for p in (self.down_s, self.down_t, self.up_s, self.up_t):
                nn.init.uniform_(p, -math.sqrt(6 / sum(p.shape)), math.sqrt(6 / sum(p.shape)))  # Glorot
            if key == config.shared_owner:
                nn.init.normal_(self.phm_rule, 0.0, 1.0 / n)
            if init and config.init_weights == "lora":
                self.up_s.zero_()  # W_up = 0: the model starts at the base

    @classmethod
    def param_count(cls, base: nn.Module, config: CompacterConfig, key: str = "") -> int:
        """``3 (d + m)`` per adapter, plus ``n^3`` on the layer that holds the shared rule."""
        d, _ = cls.dims(base, config, key)
        m = config.size(d)
        return 3 * (d + m) + (config.phm_dim ** 3 if key == config.shared_owner else 0)

    @classmethod
    def select_targets(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: CompacterConfig) -> list[str]:
        paths = super().select_targets(model, named, config)
        modules, n = dict(named), config.phm_dim
        for p in paths:
            d, _ = cls.dims(modules[p], config, p)
            if d % n or config.size(d) % n:
                raise TargetError(f"{type(config).__name__}.phm_dim: n = {n} must divide the width d = {d} of {p!r} "
                                  f"and the bottleneck m = {config.size(d)}")
        config.shared_owner = paths[0]
        return paths

    def bottleneck(self, h: Tensor) -> Tensor:
        rule = self.rules[0]
        z = F.linear(self.dropout(h.to(self.down_s.dtype)), phm_weight(rule, self.down_s, self.down_t), self.down_bias)
        z = F.linear(ACTIVATIONS[self.act](z), phm_weight(rule, self.up_s, self.up_t), self.up_bias)
        return self.scaling * z


_META = dict(category="additive", modalities=("text", "vision", "vision-language", "generation"), mergeable=False,
             position="PHM bottleneck modules after sublayers", changes_structure=True, starts_at_base=True,
             paper="arXiv 2106.04647 (Mahabadi et al. 2021)")

register_method("compacter", config=CompacterConfig, examples={"compacter": {"reduction_factor": 4.0,
                "init_weights": "lora"}}, param_formula="3 (d + m) per adapter + n^3 shared", **_META)(CompacterAdapter)


class CompacterPlusPlusAdapter(CompacterAdapter):
    """Compacter++: Compacter after the FFN output only."""


register_method("compacter_pp", config=CompacterPlusPlusConfig, examples={"compacter_pp": {"reduction_factor": 4.0,
                "init_weights": "lora"}}, param_formula="3 (d + m) per adapter + n^3 shared",
                **_META)(CompacterPlusPlusAdapter)
