"""LoRA on a whole ``nn.MultiheadAttention`` (peft's ``lora.MultiheadAttention``).

The attention holds its query / key / value projections as one packed parameter, ``in_proj_weight``
(``3d x d``), and never calls its ``out_proj`` (it reads ``out_proj.weight``). As in peft, targeting the
attention module by name puts LoRA on both:

- the in-projection: ``in_proj_weight + s B A`` with ``A`` (r, d), ``B`` (3d, r): :class:`MhaLoraAdapter`,
  held by :class:`MhaLoraLayer`, the attention's wrapper, which runs the attention with that effective
  parameter (``torch.func.functional_call``: differentiable, every path torch takes, the fused ones
  included);
- the out-projection: ``out_proj.weight + s B A`` (:class:`MhaOutProjAdapter`), held by an
  ``EffectiveWeightLayer`` (``peftkit/mha.py``) that replaces ``out_proj`` inside the attention, so its path
  is ``<attn>.base_layer.out_proj``.

peft's file keys (``<attn>.lora_A.weight``, ``<attn>.lora_B.weight``,
``<attn>.base_layer.out_proj.lora_A.weight`` ...); peft's outputs except on out_proj, whose update peft 0.21.2
applies twice (:class:`MhaOutProjAdapter`). Merge, bit-exact unmerge, disable, delete and unload are the
wrappers' own. As peft: query / key / value of one size only (``_qkv_same_embed_dim``), no DoRA, no LoRA bias,
no input dropout (the adapter acts through the weights), no mixed-adapter batch; peftkit also refuses
initialisations from the weight (PiSSA, OLoRA, LoftQ) there.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ...layers import AdapterLayer
from ...mha import EffectiveWeightLayer
from ...targeting import pattern_value
from . import dispatch
from .layer import LoraAdapter


class _InProj(nn.Module):
    """What ``LoraAdapter`` reads of its base layer, for the attention's packed in-projection: a (3d, d) weight
    (a throw-away view of the attention, never part of the model)."""

    def __init__(self, attention: nn.MultiheadAttention) -> None:
        super().__init__()
        self.weight = attention.in_proj_weight


class MhaLoraLayer(AdapterLayer):
    """The wrapper of an ``nn.MultiheadAttention`` carrying LoRA (see the module doc)."""

    def add(self, name: str, adapter: Any) -> None:
        super().add(name, adapter)
        out = adapter.out_adapter
        if hasattr(adapter, "load_device"):  # built on the meta device for a load: both parts load alike
            out.load_device = adapter.load_device
        inner = self.base_layer.out_proj
        if not isinstance(inner, AdapterLayer):
            inner = EffectiveWeightLayer(inner, "out_proj")
            self.base_layer.out_proj = inner
        inner.add(name, out)
        inner.set_active(self.active_adapters)

    def remove(self, name: str) -> None:
        super().remove(name)
        inner = self.base_layer.out_proj
        if isinstance(inner, AdapterLayer) and name in inner.adapters:
            inner.remove(name)
            if not len(inner.adapters):
                self.base_layer.out_proj = inner.base_layer

    def forward(self, query: Tensor, *args: Any, **kwargs: Any) -> Any:
        base = self.base_layer
        if self.disable_adapters:
            if self.merged_adapters:
                self.unmerge()
            return base(query, *args, **kwargs)
        acting = self._acting()
        if not acting:
            return base(query, *args, **kwargs)
        weight = base.in_proj_weight
        for name in acting:
            weight = self.adapters[name].merge_param(base, "in_proj_weight", weight)
        return torch.func.functional_call(base, {"in_proj_weight": weight}, (query, *args), kwargs)

    def _acting(self) -> list[str]:
        routing = self.routing
        if routing is None:
            return [n for n in self.active_adapters if n not in self.merged_adapters]
        names = set(routing)
        if len(names) > 1:
            raise ValueError("adapter_names: LoRA on an nn.MultiheadAttention acts through its weights, one for the "
                             f"whole batch, so its rows cannot use different adapters (got {sorted(names)}); run "
                             "each adapter's rows as a separate batch")
        return [n for n in names if n in self.adapters]


class MhaOutProjAdapter(LoraAdapter):
    """LoRA on the attention's out_proj: ``W_o + s B A``, once. (peft 0.21.2 adds ``s B A`` twice: its
    ``MultiheadAttention.merge``, which its forward runs too, writes ``W_o + s B A`` and then calls the nested
    ``lora.Linear`` merge, which adds it again; huggingface/peft PR #3774. peftkit applies the update the
    paper defines; docs/compatibility.md.) The attention reads the weight, so the update acts through the
    ``EffectiveWeightLayer``; a direct call of out_proj (rare) runs the plain LoRA forward."""

    def fused_forward(self, base: nn.Module, x: Tensor) -> Tensor | None:
        return None


class MhaLoraAdapter(LoraAdapter):
    """LoRA on an attention's ``in_proj_weight`` (plus, held by out_proj's wrapper, ``out_adapter``)."""

    layer_cls = MhaLoraLayer
    merged_params = ("in_proj_weight",)

    def __init__(self, base: nn.MultiheadAttention, config: Any, key: str = "", init: bool = True) -> None:
        where = key or "nn.MultiheadAttention"
        if not base._qkv_same_embed_dim:
            raise ValueError(f"{where}: LoRA on an nn.MultiheadAttention needs query, key and value of one size "
                             "(kdim == vdim == embed_dim), as in peft")
        if config.use_dora:
            raise ValueError(f"{where}: DoRA on an nn.MultiheadAttention is not supported (as in peft); set "
                             "use_dora=False")
        if config.lora_bias:
            raise ValueError(f"{where}: lora_bias on an nn.MultiheadAttention is not supported; set lora_bias=False")
        if config.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"{where}: init_lora_weights={config.init_lora_weights!r} on an nn.MultiheadAttention is "
                             "not supported (True, False or 'gaussian')")
        out_proj = base.out_proj  # already wrapped when another adapter is on this attention
        out_proj = out_proj.base_layer if isinstance(out_proj, AdapterLayer) else out_proj
        if not isinstance(out_proj, nn.Linear):
            raise TypeError(f"{where}: out_proj must be an nn.Linear, got {type(out_proj).__name__} (as in peft)")
        super().__init__(_InProj(base), config, key, init)  # type: ignore[arg-type]
        self.dropout = None  # acts through the weights (peft merges before the call): no input dropout
        # the out_proj part lives in out_proj's wrapper (MhaLoraLayer.add), not here: not a submodule
        object.__setattr__(self, "out_adapter", MhaOutProjAdapter(out_proj, config, key, init=init))

    def merge_param(self, base: nn.Module, name: str, value: Tensor, sign: int = 1) -> Tensor:
        """``in_proj_weight`` + s B A (out of place: differentiable in A and B)."""
        if sign < 0:
            return self.unmerge(_InProj(base), value, None)  # type: ignore[arg-type]
        return self.merge(_InProj(base), value)[0]  # type: ignore[arg-type]

    def unmerge_param(self, base: nn.Module, name: str, value: Tensor) -> Tensor:
        return self.merge_param(base, name, value, sign=-1)

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:  # pragma: no cover - never called
        raise RuntimeError("MhaLoraAdapter acts through MhaLoraLayer (the attention's weights), not on an output")

    def fused_forward(self, base: nn.Module, x: Tensor) -> Tensor | None:
        return None

    @classmethod
    def param_count(cls, base: nn.Module, config: Any, key: str = "") -> int:
        """r (d + 3d) on the in-projection, r (d + d) on out_proj."""
        d, r = base.embed_dim, pattern_value(config.rank_pattern, key, config.r)
        return r * (d + 3 * d) + r * (d + d)


dispatch.BUILTIN[nn.MultiheadAttention] = MhaLoraAdapter
