"""Bottleneck adapters: small networks inserted in sequence after a sublayer, or in parallel with it.

- Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP" (arXiv 1902.00751): two adapters per
  layer, after the attention output projection and after the FFN output projection, before the residual
  and LayerNorm: ``h <- h + W_up f(W_down h + b_d) + b_u``, near-identity init (std 1e-2); the LayerNorms
  train too (``train_layernorms``).
- Pfeiffer et al. 2021, "AdapterFusion" (arXiv 2005.00247): one adapter per layer, after the FFN output;
  AdapterHub's defaults: reduction factor 16, ReLU.
- He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning" (arXiv 2110.04366):
  parallel adapter ``FFN(x) + s W_up ReLU(W_down x)``, s = 4 (scaled PA), down Kaiming, up and biases zero.

Shapes, for a target with input width ``d_in`` and output width ``d``, bottleneck ``m``:
``W_down`` (m, d_in), ``b_d`` (m,), ``W_up`` (d, m), ``b_u`` (d,). In sequence the adapter reads the
target's output (d_in = d); in parallel it reads the target's input: parameters per adapter
``m (d_in + 1) + d (m + 1)`` = ``2dm + m + d`` when d_in = d.

Where an adapter sits is a role of the per-architecture table (``peftkit.targeting.ROLE_TABLE``):
"attention_output" and "ffn_output" are output Linears (an adapter in sequence adds to their output, which
the model then passes through dropout, residual and LayerNorm, as in Houlsby's figure 2); "ffn" is the FFN
block as a whole (Llama/GPT-2/T5/ViT/CLIP: one MLP module whose input and output the parallel adapter reads).
BERT/RoBERTa split the FFN over ``intermediate`` and ``output`` (``SPLIT_FFN``): a parallel adapter there is
two cooperating pieces of one adapter, a *tap* on ``intermediate.dense`` that holds the parameters and
computes ``s W_up f(W_down x)`` from the FFN input x, and an *add* on ``output.dense`` that adds that to
the FFN output before BertOutput's dropout, residual and LayerNorm.

``original_ln_before`` (AdapterHub's option of that name, on in its Pfeiffer / ``SeqBnConfig``): on a post-LN
model (BERT/RoBERTa) the adapter reads the sublayer's *normalised* output ``y = LN(h + r)`` (h the sublayer
output, r its residual input) and its output joins the same residual sum, normalised again by the same
LayerNorm: ``LN(h + r + s A(y))``. The wrapped module is then the LayerNorm beside the role's output Linear
(its input is ``h + r``), a "ln" piece.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...layers import Adapter
from ...kernel_helpers import adapter_dtype, layer_dims
from ...registry import register_method
from ...targeting import (
    LINEAR_TYPES, SPLIT_FFN, NotApplicableError, TargetError, find_targets, in_layers, model_family,
    role_paths,
)

from .bottleneck_config import ACTIVATIONS, BottleneckConfig, HoulsbyConfig, ParallelAdapterConfig, PfeifferConfig


class _Stash:
    """What a split-FFN tap hands to its add piece: the adapter's output for the current forward."""

    def __init__(self) -> None:
        self.value: Tensor | None = None


# tap pieces built by an injection and not yet claimed by their add piece, by (config id, layer prefix)
_PENDING: dict[tuple[int, str], _Stash] = {}


def adapter_factory(base: nn.Module) -> dict[str, Any]:
    """Device and dtype for an adapter's parameters: the base's, but float32 when the base is half precision
    or quantized (``adapter_dtype``)."""
    ref = next(iter(base.parameters()), None)
    if ref is None:
        return {}
    return {"device": ref.device, "dtype": adapter_dtype(base)}


def norm_width(module: nn.Module) -> int:
    """d of a LayerNorm-like module (its normalised width)."""
    shape = getattr(module, "normalized_shape", None)
    return int(shape[-1]) if shape else int(module.weight.shape[-1])


def _is_norm(module: nn.Module) -> bool:
    return type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def _first_last_linear(module: nn.Module) -> tuple[nn.Module, nn.Module]:
    linears = [m for m in module.modules() if isinstance(m, LINEAR_TYPES)]
    if not linears:
        raise TargetError(f"{type(module).__name__} has no Linear inside; a bottleneck adapter needs its width")
    return linears[0], linears[-1]


def block_dims(module: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of a Linear, or of a block (first Linear's input, last Linear's output)."""
    if isinstance(module, LINEAR_TYPES):
        return layer_dims(module)
    first, last = _first_last_linear(module)
    return layer_dims(last)[0], layer_dims(first)[1]


def _piece(config: BottleneckConfig, path: str) -> str:
    """"seq", "ln" (in sequence, hosted by the sublayer's LayerNorm: ``original_ln_before``), "par", "tap" (split
    FFN input) or "add" (split FFN output) for the module at ``path``."""
    if config.mode == "sequential":
        return "ln" if getattr(config, "original_ln_before", False) else "seq"
    if config.split_ffn:
        out_name, in_name = config.split_ffn
        if path == in_name or path.endswith("." + in_name):
            return "tap"
        if path == out_name or path.endswith("." + out_name):
            return "add"
    return "par"


class BottleneckAdapter(Adapter):
    """``h + s W_up f(W_down h)`` in sequence, ``out + s W_up f(W_down x)`` in parallel (see the module doc)."""

    supported_layers = LINEAR_TYPES
    default_roles = ("attention_output", "ffn_output")
    checkpoint_keys: ClassVar[dict[str, str]] = {
        "down_weight": "adapter_down.weight", "down_bias": "adapter_down.bias",
        "up_weight": "adapter_up.weight", "up_bias": "adapter_up.bias",
    }

    def __init__(self, base: nn.Module, config: BottleneckConfig, key: str = "", init: bool = True) -> None:
        super().__init__()
        self.piece = _piece(config, key)
        self.scaling = config.scaling
        self.residual = config.residual
        self.act = config.non_linearity
        self.dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        prefix = key[: len(key) - len(config.split_ffn[self.piece == "tap"])] if self.piece in ("tap", "add") else ""
        if self.piece == "add":
            stash = _PENDING.pop((id(config), prefix), None)
            if stash is None:
                raise TargetError(f"{key}: no FFN input module {prefix + config.split_ffn[1]!r} to pair with")
            self.stash = stash
            self.checkpoint_keys = {}
            return
        if self.piece == "tap":
            self.stash = _PENDING[(id(config), prefix)] = _Stash()
        d_in, d_out = self.dims(base, config, key)
        m = config.size(d_out)
        kw = adapter_factory(base)
        self.down_weight = nn.Parameter(torch.zeros(m, d_in, **kw))  # (m, d_in)
        self.down_bias = nn.Parameter(torch.zeros(m, **kw))  # (m,)
        self.up_weight = nn.Parameter(torch.zeros(d_out, m, **kw))  # (d, m)
        self.up_bias = nn.Parameter(torch.zeros(d_out, **kw))  # (d,)
        if init:
            self.reset(config.init_weights)

    @torch.no_grad()
    def reset(self, scheme: str) -> None:
        if scheme == "bert":
            for w in (self.down_weight, self.up_weight):
                w.normal_(0.0, 1e-2)
        else:
            nn.init.kaiming_uniform_(self.down_weight, a=math.sqrt(5))
            self.up_weight.zero_()
        self.down_bias.zero_()
        self.up_bias.zero_()

    @staticmethod
    def dims(base: nn.Module, config: BottleneckConfig, key: str) -> tuple[int, int]:
        """(d_in, d) of the adapter on ``base``: its input width and output width."""
        piece = _piece(config, key)
        if piece == "ln":
            return norm_width(base), norm_width(base)
        d_out, d_in = block_dims(base)
        if piece == "seq":
            return d_out, d_out
        if piece == "tap":  # reads and returns the FFN's width: the input Linear's input
            return d_in, d_in
        return d_in, d_out

    @classmethod
    def param_count(cls, base: nn.Module, config: BottleneckConfig, key: str = "") -> int:
        """Closed form per adapter: ``m (d_in + 1) + d (m + 1)`` (= 2dm + m + d when d_in = d); 0 on a
        split FFN's add piece (its tap holds the parameters)."""
        if _piece(config, key) == "add":
            return 0
        d_in, d = cls.dims(base, config, key)
        m = config.size(d)
        return m * (d_in + 1) + d * (m + 1)

    # -- targeting ---------------------------------------------------------------------------------------
    @classmethod
    def prepare_config(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: BottleneckConfig) -> None:
        family = model_family(model)
        if (config.mode == "parallel" and config.target_modules is None and "ffn" in config.positions
                and config.split_ffn is None and family in SPLIT_FFN):
            config.split_ffn = list(SPLIT_FFN[family])
        if config.train_layernorms:
            norms = sorted({n.rsplit(".", 1)[-1] for n, m in named
                            if n and type(m).__name__.endswith(("LayerNorm", "RMSNorm"))})
            config.modules_to_save = list(dict.fromkeys([*(config.modules_to_save or []), *norms]))

    @classmethod
    def select_targets(
        cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: BottleneckConfig
    ) -> list[str]:
        modules = dict(named)
        if config.target_modules is not None:
            paths = find_targets(model, named, config, (), (nn.Module,))
        else:
            if model_family(model) is None:
                raise NotApplicableError(f"{type(model).__name__} has no entry in peftkit's role table; set "
                                  f"target_modules to module paths instead of positions {config.positions}")
            found: set[str] = set()
            for role in config.positions:
                hits = role_paths(model, named, role)
                if not hits:
                    raise NotApplicableError(
                        f"{type(config).__name__}.positions: {model_family(model)} models have no {role!r} module")
                found.update(h for h in hits if in_layers(config, h))  # role paths are full: filter them here
            paths = find_targets(model, named, dataclasses.replace(config, target_modules=sorted(found)), (),
                                 (nn.Module,))
        if config.mode == "sequential":
            bad = [p for p in paths if not isinstance(modules[p], LINEAR_TYPES)]
            if bad:
                raise TargetError(f"{bad[0]!r} is a {type(modules[bad[0]]).__name__}; an adapter in sequence wraps "
                                  f"a Linear / Conv1D (mode='parallel' wraps blocks)")
        for p in paths:
            block_dims(modules[p])  # a clear error for a block without a Linear, before any change
        if config.original_ln_before:
            paths = [_sibling_norm(modules, p) for p in paths]
        if config.split_ffn:  # each FFN output gets its tap on the sibling input module, placed before it
            out_name, in_name = config.split_ffn
            with_taps = []
            for p in paths:
                if _piece(config, p) == "add":
                    tap = p[: len(p) - len(out_name)] + in_name
                    if tap not in modules:
                        raise TargetError(f"split_ffn: {p!r} has no sibling FFN input module {tap!r}")
                    with_taps.append(tap)
                with_taps.append(p)
            paths = list(dict.fromkeys(with_taps))
        return paths

    # -- forward -----------------------------------------------------------------------------------------
    def bottleneck(self, h: Tensor) -> Tensor:
        """``s (W_up f(W_down h + b_d) + b_u)``, h (..., d_in) -> (..., d)."""
        dt = self.down_weight.dtype
        z = F.linear(self.dropout(h.to(dt)), self.down_weight, self.down_bias)  # (..., m)
        z = F.linear(ACTIVATIONS[self.act](z), self.up_weight, self.up_bias)  # (..., d)
        return self.scaling * z

    def forward(self, base: nn.Module, x: Tensor, out: Tensor, gate: Callable[[Tensor], Tensor] | None = None
                ) -> Tensor:
        """``gate``: a hybrid's gate, a function of the adapter's input that scales its output (UniPELT)."""
        if self.piece == "add":
            z, self.stash.value = self.stash.value, None
            if z is None:
                raise RuntimeError("split-FFN parallel adapter: the FFN input module did not run before its output")
            return out + z.to(out.dtype)
        h = out if self.piece in ("seq", "ln") else x  # the adapter's input
        z = self.bottleneck(h)
        if gate is not None:
            z = z * gate(h)
        if self.piece == "tap":
            self.stash.value = z
            return out
        z = z.to(out.dtype)
        if self.piece == "ln":  # x = h + r, the LayerNorm's input; out = LN(x)
            return base(x + z)
        if self.piece == "seq" and not self.residual:
            return z
        return out + z


def _sibling_norm(modules: dict[str, nn.Module], path: str) -> str:
    """The LayerNorm beside the output Linear at ``path`` (post-LN models: BERT's ``output.LayerNorm``)."""
    parent = path.rpartition(".")[0]
    norms = [n for n, m in modules.items() if n.rpartition(".")[0] == parent and n != path and _is_norm(m)]
    if len(norms) != 1:
        raise NotApplicableError(
            f"original_ln_before: {path!r} has {'no' if not norms else 'more than one'} LayerNorm beside it "
            f"({norms}); the option needs a post-LN model (BERT/RoBERTa), where the sublayer's residual and "
            "LayerNorm follow its output Linear")
    return norms[0]


# what every registered bottleneck variant shares (each is a config with other defaults, and an adapter subclass)
VARIANT_META: dict[str, Any] = dict(
    category="additive", mergeable=False,
    param_formula="m (d_in + 1) + d (m + 1) per adapter (2dm + m + d in sequence)",
    position="bottleneck modules after / beside sublayers", changes_structure=True, starts_at_base=True,
)
_ALL_MODALITIES = ("text", "vision", "vision-language", "generation")


@register_method("houlsby", config=HoulsbyConfig, modalities=_ALL_MODALITIES,
                 paper="arXiv 1902.00751 (Houlsby et al. 2019)",
                 examples={"houlsby": {"bottleneck_size": 4, "init_weights": "lora"}}, **VARIANT_META)
class HoulsbyAdapter(BottleneckAdapter):
    """Houlsby adapter: after the attention output and the FFN output, ``h + W_up f(W_down h)``, m = 64."""


@register_method("pfeiffer", config=PfeifferConfig, modalities=_ALL_MODALITIES,
                 paper="arXiv 2005.00247 (Pfeiffer et al. 2021)",
                 examples={"pfeiffer": {"reduction_factor": 8.0, "init_weights": "lora"}}, **VARIANT_META)
class PfeifferAdapter(BottleneckAdapter):
    """Pfeiffer adapter: after the FFN output only, reduction factor 16, ReLU."""


@register_method("parallel_adapter", config=ParallelAdapterConfig, modalities=_ALL_MODALITIES,
                 paper="arXiv 2110.04366 (He et al. 2022)", examples={"parallel_adapter": {"bottleneck_size": 4}},
                 **VARIANT_META)
class ParallelAdapterAdapter(BottleneckAdapter):
    """Scaled parallel adapter beside the FFN: ``FFN(x) + s W_up ReLU(W_down x)``, s = 4, m = 512, up zero-init."""
