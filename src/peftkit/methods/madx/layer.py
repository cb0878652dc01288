"""MAD-X (Pfeiffer et al. 2020, "MAD-X: An Adapter-Based Framework for Multi-Task Cross-Lingual Transfer",
arXiv 2005.00052): language adapters with an invertible adapter, stacked under task adapters.

The language adapter is a Pfeiffer bottleneck adapter (``h + W_up ReLU(W_down h)`` after each FFN output, see
``peftkit.methods.adapters.bottleneck``) plus an *invertible adapter* A_inv, a NICE coupling block (``functional``)
on the input embeddings: ``e <- A_inv(e)``; its exact inverse runs on the last hidden state right before the
output embeddings (the tied vocabulary projection): ``logits = W_E A_inv^{-1}(h)``. The task adapter is a plain
Pfeiffer adapter; ``Stack("lang", "task")`` (``peftkit.methods.adapters.composition``) runs it on the language
adapter's output at each layer, as in the paper's figure 1.

Pieces (by module path, the ``inv_adapter_modules`` the injection fills in):
- "inv" on the input embeddings (BERT/RoBERTa: ``embeddings.LayerNorm``, so the coupling reads the summed,
  normalised embeddings as AdapterHub's hook after ``BertEmbeddings`` does; other models: the token embedding).
  It holds F and G: file keys ``invertible_adapter.F.{0,2}.{weight,bias}`` and ``.G.{0,2}...`` (AdapterHub's
  ``nn.Sequential`` indices), ``F: d2 -> h_F = floor(d2 / r) -> d1``, ``G: d1 -> h_G = floor(d1 / r) -> d2``, d1 = floor(d/2),
  d2 = d - d1: ``d2 h_F + h_F + h_F d1 + d1 + d1 h_G + h_G + h_G d2 + d2`` parameters.
- "rev" on the output embeddings (``get_output_embeddings()``, absent on encoders without an LM head): computes
  ``base(A_inv^{-1}(x))`` with the "inv" piece's F and G (no parameters of its own).
- the bottleneck adapters, as ``PfeifferConfig``.

Initialisation: as AdapterHub's (``init_bert_weights``), every weight of F and G ~ N(0, 0.02^2), biases 0, so the
coupling acts from the start and the model does not start at the base. With ``init_weights="lora"`` (the
bottleneck's zero up-projection) F's and G's output Linears start at zero as well, which makes the coupling the
identity and the whole model the base at init (the registry example's setting, as for the other bottleneck
adapters, whose default "bert" init is near the base, not at it).

Where this differs from AdapterHub: on BERT-like models AdapterHub's coupling follows the embedding block's
dropout, peftkit's precedes it (identical in eval mode; in training the dropout mask falls after the coupling).
On T5 the shared token embedding feeds encoder and decoder, so the coupling acts on both inputs. Models whose
``get_input_embeddings()`` is not an ``nn.Embedding`` (CLIPModel, vision models) raise NotApplicableError; set
``inv_adapter_modules`` by hand for a text tower. AdapterHub's "glow" block is not implemented.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ...registry import register_method
from ...targeting import LINEAR_TYPES, NotApplicableError, TargetError
from ..adapters.bottleneck_config import ACTIVATIONS
from ..adapters.bottleneck import VARIANT_META, BottleneckAdapter, adapter_factory, norm_width
from .config import PfeifferInvConfig
from .functional import nice_forward, nice_inverse

_MLPS = ("f", "g")
_PARTS = (("down_weight", "0.weight"), ("down_bias", "0.bias"), ("up_weight", "2.weight"), ("up_bias", "2.bias"))
# "inv" pieces built by an injection and not yet claimed by their "rev" piece, by config id
_PENDING: dict[int, "PfeifferInvAdapter"] = {}


def inv_piece(config: PfeifferInvConfig, key: str) -> str | None:
    """"inv", "rev" or None (a bottleneck piece) for the module at ``key``."""
    mods = config.inv_adapter_modules or [None, None]
    return "inv" if key == mods[0] else "rev" if key and key == mods[1] else None


def _width(base: nn.Module) -> int:
    """d of the coupling: the embedding width, the LayerNorm width, or the output projection's input width."""
    if isinstance(base, nn.Embedding):
        return base.embedding_dim
    if isinstance(base, LINEAR_TYPES):
        return base.in_features if hasattr(base, "in_features") else base.weight.shape[0]  # Conv1D: (in, out)
    return norm_width(base)


def _path_of(named: list[tuple[str, nn.Module]], module: nn.Module | None) -> str | None:
    return next((n for n, m in named if m is module), None) if module is not None else None


@register_method("pfeiffer_inv", config=PfeifferInvConfig, modalities=("text",),
                 paper="arXiv 2005.00052 (Pfeiffer et al. 2020, MAD-X)",
                 examples={"pfeiffer_inv": {"reduction_factor": 8.0, "init_weights": "lora"}},
                 **{**VARIANT_META,
                    "param_formula": "Pfeiffer's m (d_in + 1) + d (m + 1) per adapter, plus the NICE coupling "
                                     "d2 h_F + h_F + h_F d1 + d1 + d1 h_G + h_G + h_G d2 + d2 once",
                    "position": "NICE coupling on the input embeddings, its inverse before the LM head; "
                                "bottleneck after each FFN output"})
class PfeifferInvAdapter(BottleneckAdapter):
    """A Pfeiffer adapter, or (on the embeddings) MAD-X's NICE coupling, or (on the LM head) its inverse."""

    supported_layers = (nn.Module,)

    def __init__(self, base: nn.Module, config: PfeifferInvConfig, key: str = "", init: bool = True) -> None:
        piece = inv_piece(config, key)
        if piece is None:
            super().__init__(base, config, key, init)
            return
        nn.Module.__init__(self)
        self.piece = piece
        self.act = config.non_linearity
        if piece == "rev":
            owner = _PENDING.pop(id(config), None)
            if owner is None:
                raise TargetError(f"{key}: no invertible adapter on {config.inv_adapter_modules[0]!r} to invert")
            self.__dict__["owner"] = owner  # not a submodule: F and G are saved and trained once, on "inv"
            self.checkpoint_keys = {}
            return
        d1, d2 = self.halves(base)
        h_f, h_g = config.inv_width(d2), config.inv_width(d1)
        if min(h_f, h_g) < 1:
            raise TargetError(f"{key}: inv_adapter_reduction_factor={config.inv_adapter_reduction_factor} leaves no "
                              f"hidden unit for a coupling of width {d1 + d2}; expected at most {min(d1, d2)}")
        kw = adapter_factory(base)
        for name, d_in, h, d_out in (("f", d2, h_f, d1), ("g", d1, h_g, d2)):
            setattr(self, f"{name}_down_weight", nn.Parameter(torch.empty(h, d_in, **kw)))
            setattr(self, f"{name}_down_bias", nn.Parameter(torch.empty(h, **kw)))
            setattr(self, f"{name}_up_weight", nn.Parameter(torch.empty(d_out, h, **kw)))
            setattr(self, f"{name}_up_bias", nn.Parameter(torch.empty(d_out, **kw)))
        self.checkpoint_keys = {f"{n}_{attr}": f"invertible_adapter.{n.upper()}.{k}" for n in _MLPS
                                for attr, k in _PARTS}
        _PENDING[id(config)] = self
        if init:
            self.reset(config.init_weights)

    @staticmethod
    def halves(base: nn.Module) -> tuple[int, int]:
        d = _width(base)
        return d // 2, d - d // 2

    @torch.no_grad()
    def reset(self, scheme: str) -> None:
        if getattr(self, "piece", None) != "inv":
            return super().reset(scheme)
        for name in _MLPS:  # AdapterHub's init_bert_weights on the NICECouplingBlock
            for w, b in (("down_weight", "down_bias"), ("up_weight", "up_bias")):
                getattr(self, f"{name}_{w}").normal_(0.0, 0.02)
                getattr(self, f"{name}_{b}").zero_()
            if scheme == "lora":  # the output Linear at zero: the coupling starts as the identity
                getattr(self, f"{name}_up_weight").zero_()
                getattr(self, f"{name}_up_bias").zero_()

    def mlps(self) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        src = self.owner if self.piece == "rev" else self
        return tuple(tuple(getattr(src, f"{n}_{a}") for a, _ in _PARTS) for n in _MLPS)  # type: ignore[return-value]

    @classmethod
    def param_count(cls, base: nn.Module, config: PfeifferInvConfig, key: str = "") -> int:
        piece = inv_piece(config, key)
        if piece is None:
            return super().param_count(base, config, key)
        if piece == "rev":
            return 0
        d1, d2 = cls.halves(base)
        h_f, h_g = config.inv_width(d2), config.inv_width(d1)
        return d2 * h_f + h_f + h_f * d1 + d1 + d1 * h_g + h_g + h_g * d2 + d2

    # -- targeting ---------------------------------------------------------------------------------------
    @classmethod
    def prepare_config(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: PfeifferInvConfig) -> None:
        super().prepare_config(model, named, config)
        if config.inv_adapter_modules is not None:
            return
        try:
            emb = model.get_input_embeddings()
        except (AttributeError, NotImplementedError):
            emb = None
        if not isinstance(emb, nn.Embedding):
            raise NotApplicableError(f"PfeifferInvConfig.inv_adapter: {type(model).__name__} has no token embedding "
                                     f"(get_input_embeddings() gives {type(emb).__name__}); the invertible adapter "
                                     "acts on token embeddings")
        inp = _path_of(named, emb)
        parent = inp.rpartition(".")[0]
        modules = dict(named)
        norm = f"{parent}.LayerNorm" if parent else "LayerNorm"
        if norm in modules and isinstance(modules.get(f"{parent}.word_embeddings" if parent else "word_embeddings"),
                                          nn.Embedding):
            inp = norm  # BERT-like embedding block: words + positions + types, then LayerNorm
        try:
            out_emb = model.get_output_embeddings()
        except (AttributeError, NotImplementedError):
            out_emb = None
        out = _path_of(named, out_emb) if isinstance(out_emb, LINEAR_TYPES) else None
        config.inv_adapter_modules = [inp, out]

    @classmethod
    def select_targets(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: PfeifferInvConfig
                       ) -> list[str]:
        paths = super().select_targets(model, named, config)
        inp, out = config.inv_adapter_modules
        modules = dict(named)
        for p, what in ((inp, "input"), (out, "output")):
            if p is not None and p not in modules:
                raise TargetError(f"PfeifferInvConfig.inv_adapter_modules: no {what} module {p!r} in the model")
        if inp in paths or (out is not None and out in paths):
            raise TargetError(f"PfeifferInvConfig: {inp!r} / {out!r} are both a bottleneck target and an "
                              "invertible adapter site; set target_modules to exclude them")
        return [inp, *[p for p in paths], *([out] if out is not None else [])]  # "inv" is built before "rev"

    # -- forward -----------------------------------------------------------------------------------------
    def _apply(self, fn: Any, h: Tensor) -> Tensor:
        f, g = self.mlps()
        dt = f[0].dtype
        return fn(h.to(dt), f, g, ACTIVATIONS[self.act]).to(h.dtype)

    def fused_forward(self, base: nn.Module, x: Tensor) -> Tensor | None:
        if getattr(self, "piece", None) == "rev":  # one pass: the LM head on the inverted hidden states
            return base(self._apply(nice_inverse, x))
        return None

    def forward(self, base: nn.Module, x: Tensor, out: Tensor, gate: Any = None) -> Tensor:
        if self.piece == "inv":
            return self._apply(nice_forward, out)
        if self.piece == "rev":
            return base(self._apply(nice_inverse, x))
        return super().forward(base, x, out, gate)
