"""FacT (Jie & Deng 2023, "FacT: Factor-Tuning for Lightweight Adaptation on Vision Transformer", arXiv 2212.03145).

The updates of all adapted weights of the model are one tensor, factorised across layers. Every weight is cut
into d x d slices (ViT-B: q, k, v, o are one slice each, fc1 (4d x d) and fc2 (d x 4d) four each: 12 L slices
of 768 x 768), and the stacked slices' update is a low-rank tensor with factors shared by all of them:

    FacT-TT (tensor-train):  dW_n = s U Sigma_n V^T          Sigma_n (r x r) one core per slice n
    FacT-TK (Tucker):        dW_n = s U (C x3 P_n) V^T       C (r x r x r) shared, P_n (r,) one row per slice

``U`` (d x r, output side) and ``V`` (d x r, input side) are adapter-level state, shared by every adapted
weight (one copy per adapter, the same ``nn.Parameter`` referenced by every layer's adapter, counted once);
``C`` too (FacT-TK). A weight of a x b slices keeps its cores stacked as ``S`` (a r x b r): the tensor-train
cores themselves (``fact_S``), or for FacT-TK its rows of ``P`` (``fact_P``, a b x r), from which
``S_ij = C x3 P_{ib+j}``. Parameters: FacT-TT ``2dr + r^2`` per slice, FacT-TK ``2dr + r^3 + r`` per slice.

Initialisation as the official code (``FacTv`` zero, ``FacTu`` and the TT cores as ``nn.Linear``, C and P
Xavier-uniform): ``U = 0`` so the model starts at the base; ``V`` and the TT cores Kaiming-uniform
(``nn.Linear``'s bound ``1 / sqrt(fan_in)``); ``C`` and P Xavier-uniform (P per weight, over its own rows; the
official code draws the whole 12 L x r matrix at once, a wider bound). Dropout (0.1 in the official code) acts on
the rank-r activation ``Sigma V^T x`` before ``U``; the merged weight ``W + dW`` has none, and unmerge restores
``W`` bit for bit (the shared wrapper's exact restore).

File keys (peft has no FacT): ``<layer>.fact_S`` (TT) or ``<layer>.fact_P`` (TK) per adapted weight, and
``base_model.fact_U``, ``base_model.fact_V``, ``base_model.fact_C`` (TK) once per adapter. Beyond the paper's
ViT: a width that d does not divide (GQA keys, a 37-wide FFN) takes ``ceil(width / d)`` slices, the last one
cropped, so any Linear / GPT-2 Conv1D can be adapted; with widths that are multiples of d it is the paper's form.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ...kernel_helpers import adapter_dtype, is_transposed, layer_dims
from ...layers import Adapter, SharedState
from ...registry import register_method
from ...targeting import LINEAR_TYPES
from . import functional as FF
from .config import FacTConfig

_ROLES = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")


def slice_width(targets: list[tuple[str, nn.Module]]) -> int:
    """d: the most common input width among the targets (the smallest of equally common ones)."""
    counts = Counter(layer_dims(base)[1] for _, base in targets)
    return min(counts, key=lambda w: (-counts[w], w))


def slices(base: nn.Module, d: int) -> tuple[int, int]:
    """(a, b): how many d-wide slices cover the weight's output and input widths."""
    d_out, d_in = layer_dims(base)
    return FF.num_slices(d_out, d), FF.num_slices(d_in, d)


@register_method(
    "fact",
    config=FacTConfig,
    category="reparameterized",
    modalities=("vision", "text", "vision-language"),
    mergeable=True,
    param_formula="TT: r^2 per d x d slice, TK: r per slice; plus U, V (d x r) once (TK: and C, r^3)",
    position="weight delta s U Sigma V^T per d x d slice; U, V (and C) shared by every adapted weight",
    paper="arXiv 2212.03145 (Jie & Deng 2023)",
    starts_at_base=True,
    examples={"fact_tt": {"fact_type": "tt", "r": 2, "scale": 0.1, "dropout": 0.0},
              "fact_tk": {"fact_type": "tk", "r": 3, "dropout": 0.0}},
)
class FacTAdapter(Adapter):
    supported_layers = LINEAR_TYPES
    default_roles = {"gpt2": ("qkv", "attn_out", "ffn_in", "ffn_out"), "*": _ROLES}
    checkpoint_keys: ClassVar[dict[str, str]] = {"fact_S": "fact_S"}
    uses_shared_state = True
    shared_checkpoint_keys: ClassVar[dict[str, str]] = {"fact_U": "fact_U", "fact_V": "fact_V", "fact_C": "fact_C"}

    def __init__(self, base: nn.Module, config: FacTConfig, key: str = "", init: bool = True,
                 shared: SharedState | None = None) -> None:
        super().__init__()
        if shared is None:  # a stand-alone adapter (outside a tuner) owns its factors
            shared = SharedState(self.build_shared([(key, base)], config, {}))
        self.__dict__["shared"] = shared
        # the tuner's factors, registered here too (the same Parameters: counted and trained once)
        self.fact_U, self.fact_V = shared.fact_U, shared.fact_V
        self.tucker = config.fact_type == "tk"
        if self.tucker:
            self.fact_C = shared.fact_C
        self.d_out, self.d_in = layer_dims(base)
        self.transposed = is_transposed(base)
        self.scale = config.scale
        self.dropout = nn.Dropout(config.dropout) if config.dropout else None
        r, (a, b) = config.r, slices(base, self.fact_U.shape[0])
        self.a, self.b = a, b
        kw = {"device": base.weight.device, "dtype": adapter_dtype(base)}
        if self.tucker:
            self.checkpoint_keys = {"fact_P": "fact_P"}
            self.fact_P = nn.Parameter(torch.zeros(a * b, r, **kw))  # this weight's rows of P
        else:
            self.fact_S = nn.Parameter(torch.zeros(a * r, b * r, **kw))  # the stacked TT cores
        if init:
            with torch.no_grad():
                if self.tucker:
                    nn.init.xavier_uniform_(self.fact_P)
                else:
                    nn.init.kaiming_uniform_(self.fact_S, a=math.sqrt(5))

    # -- the shared factors ------------------------------------------------------------------------------------
    @classmethod
    def prepare_config(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: FacTConfig) -> None:
        """``hidden_size`` (d), when unset: the most common input width among the targets."""
        if config.hidden_size is None:
            modules = dict(named)
            config.hidden_size = slice_width([(p, modules[p]) for p in cls.select_targets(model, named, config)])

    @classmethod
    def build_shared(cls, targets: list[tuple[str, nn.Module]], config: FacTConfig,
                     others: dict[str, tuple[Any, dict[str, Tensor]]]) -> dict[str, Tensor]:
        """U (d, r) zero, V (d, r) Kaiming-uniform (bound 1 / sqrt(d)), and for FacT-TK C (r, r, r) Xavier-uniform:
        trainable Parameters, one set per adapter (``others`` is not used)."""
        d, r = config.hidden_size or slice_width(targets), config.r
        kw = {"device": targets[0][1].weight.device, "dtype": adapter_dtype(targets[0][1])}
        u, v = torch.zeros(d, r, **kw), torch.zeros(d, r, **kw)
        nn.init.kaiming_uniform_(v.t(), a=math.sqrt(5))  # as nn.Linear(d, r).weight, stored transposed
        out = {"fact_U": nn.Parameter(u), "fact_V": nn.Parameter(v)}
        if config.fact_type == "tk":
            out["fact_C"] = nn.Parameter(nn.init.xavier_uniform_(torch.zeros(r, r, r, **kw)))
        return out

    @classmethod
    def shared_param_count(cls, targets: list[tuple[str, nn.Module]], config: FacTConfig) -> int:
        """U and V (d x r each), and C (r^3) for FacT-TK, once per adapter."""
        d, r = config.hidden_size or slice_width(targets), config.r
        return 2 * d * r + (r ** 3 if config.fact_type == "tk" else 0)

    @classmethod
    def param_count(cls, base: nn.Module, config: FacTConfig, key: str = "") -> int:
        """Closed form per weight of a x b slices: ``a b r^2`` (TT cores) or ``a b r`` (TK rows of P)."""
        a, b = slices(base, config.hidden_size or layer_dims(base)[1])
        return a * b * config.r * (config.r if config.fact_type == "tt" else 1)

    # -- forward and merge -----------------------------------------------------------------------------------
    def cores(self) -> Tensor:
        """``S`` (a r, b r): the stacked cores of this weight's slices."""
        if self.tucker:
            return FF.tucker_cores(self.fact_C, self.fact_P, self.a, self.b)
        return self.fact_S

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        u = self.fact_U
        delta = FF.fact_apply(x.to(u.dtype), u, self.fact_V, self.cores(), self.d_out, self.scale, self.dropout)
        return out + delta.to(out.dtype)

    def delta_weight(self, base: nn.Module) -> Tensor:
        """``s U Sigma V^T`` per slice, in the base weight's layout ((d_in, d_out) for Conv1D)."""
        delta = FF.fact_delta(self.fact_U, self.fact_V, self.cores(), self.d_out, self.d_in, self.scale)
        return delta.t() if self.transposed else delta
