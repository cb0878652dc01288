"""Adapters on modules whose parent reads their parameters instead of calling them.

``nn.MultiheadAttention`` never calls its ``out_proj`` module: its forward hands ``out_proj.weight`` and
``out_proj.bias`` to ``F.multi_head_attention_forward`` (in eval without autograd, to the fused
``torch._native_multi_head_attention``). ``nn.TransformerEncoderLayer``'s fused inference path (eval, no
autograd; ``nn.TransformerEncoder``'s nested-tensor path too) reads the weights and biases of ``linear1``,
``linear2``, ``norm1``, ``norm2`` and ``self_attn.out_proj`` the same way. A wrapper there sees no call, so an
ordinary ``AdapterLayer`` would leave the output unchanged until merged (Hugging Face PEFT 0.21.2 has this
defect: CLIP / SigLIP towers of open_clip, ``nn.TransformerEncoderLayer``, ``"all-linear"``).

The tuner wraps such a module in :class:`EffectiveWeightLayer` instead: an ``AdapterLayer`` whose ``weight``
and ``bias`` read as the *effective* parameters, the base ones with the acting adapters applied in order by
:func:`effective_param` (each method's merge, out of place, so differentiable in the adapter's parameters).
Every path that reads them (attention slow path, both fused paths, ``need_weights``, masks, ``batch_first``)
then computes with the adapted module; calling the wrapper (the encoder layer's ordinary path) runs the usual
``AdapterLayer`` forward. The parent module, its class and its forward are untouched. Nothing is stored: the
parameters are formed on each read (LoRA: ``r d^2 + d^2`` operations, small next to the attention), so a
forward changes no state (threads, ``torch.compile``), and the state dict keeps the wrapper's keys
(``out_proj.base_layer.weight``; the adapter file has PEFT's ``out_proj.lora_A.weight``). Merge, unmerge
(bit-exact), disable and delete are the ``AdapterLayer``'s own.

What a weight cannot carry: input-side dropout of the adapter (``lora_dropout`` and the like) is not applied on
an attention's out_proj (a warning says so at injection), as when merged; a mixed batch (``adapter_names``)
must use one adapter for all its rows there. DoRA's weight there is its merge, whose gradient flows through
the weight norm (its forward detaches the norm: same output, the exact gradient). Methods that are not weight
deltas (bottleneck adapters, prompts) cannot act through a weight: an explicit target is refused with the
module path, ``"all-linear"`` skips those modules with a warning.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

from torch import Tensor, nn

from .layers import Adapter, AdapterLayer
from .targeting import ALL_LINEAR, TargetError

# parent type -> the children whose weight / bias its forward reads itself, and when
READ_BY_PARENT: dict[type, tuple[tuple[str, ...], str]] = {
    nn.MultiheadAttention: (("out_proj",), "nn.MultiheadAttention never calls its out_proj (it reads "
                                           "out_proj.weight / .bias)"),
    nn.TransformerEncoderLayer: (("linear1", "linear2", "norm1", "norm2"),
                                 "nn.TransformerEncoderLayer's fused inference path (eval without autograd) "
                                 "reads {child}.weight / .bias instead of calling {child}"),
}


def read_by_parent(model: nn.Module, path: str) -> tuple[type, str] | None:
    """(parent type, why) when the module at ``path`` is one whose parent reads its parameters, else None."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    for kind, (children, why) in READ_BY_PARENT.items():
        if isinstance(parent, kind) and child in children:
            return kind, why.format(child=child)
    return None


def effective_param(adapter: Adapter, base: nn.Module, name: str, value: Tensor) -> Tensor:
    """``value`` (the base parameter ``name``, or the result of the adapters before this one) with ``adapter``
    applied, differentiable in the adapter's parameters and free of side effects.

    ``Adapter.effective_param``: the merge, unless the method says otherwise."""
    return adapter.effective_param(base, name, value)


class EffectiveWeightLayer(AdapterLayer):
    """The wrapper of a module whose parent reads its parameters (see the module doc): ``weight`` and
    ``bias`` are the effective ones (base + acting adapters). Calling it runs the ``AdapterLayer`` forward."""

    def __init__(self, base_layer: nn.Module, path: str = "") -> None:
        super().__init__(base_layer)
        self.path = path  # for error messages: the module path in the user's model

    @property
    def weight(self) -> Tensor:
        return self._read("weight")

    @property
    def bias(self) -> Tensor | None:
        return self._read("bias")

    def _read(self, name: str) -> Tensor | None:
        try:
            return self.effective(name)
        except AttributeError as err:
            # an AttributeError escaping a property makes Python fall back to __getattr__, i.e. silently to
            # the bare base parameter: report it as what it is
            raise RuntimeError(f"{self.path or type(self).__name__}.{name}: {err}") from err

    def effective(self, name: str) -> Tensor | None:
        """Base parameter ``name`` with the acting, unmerged adapters applied (merged ones are in it already)."""
        if self.disable_adapters and self.merged_adapters:
            self.unmerge()  # as AdapterLayer.forward does when disabled
        base = self.base_layer
        value = getattr(base, name, None)
        if self.disable_adapters:
            return value
        for adapter_name in self._acting():
            adapter = self.adapters[adapter_name]
            if not adapter.changes_output or name not in adapter.merged_params:
                continue
            if value is None:  # e.g. SSF's shift on a bias-free projection
                value = adapter.missing_param(base, name)
                if value is None:
                    continue
            value = effective_param(adapter, base, name, value)
        return value

    def _acting(self) -> list[str]:
        if self.routing is None:
            return [n for n in self.active_adapters if n not in self.merged_adapters]
        names = set(self.routing)
        if len(names) > 1:
            raise ValueError(
                f"adapter_names: {self.path or 'this layer'}'s parent module reads its weight (e.g. the out_proj of "
                "an nn.MultiheadAttention), one weight for the whole batch, so its rows cannot use different "
                f"adapters (got {sorted(names)}); run each adapter's rows as a separate batch"
            )
        return [n for n in names if n in self.adapters]


def select_targets(
    cls: type, model: nn.Module, named: list[tuple[str, nn.Module]], config: Any, spec: Any
) -> tuple[list[str], set[str]]:
    """``cls.select_targets`` aware of parents that read their children's parameters: the paths to wrap, and
    which of them to wrap in :class:`EffectiveWeightLayer`.

    A method that is not a weight delta (``spec.mergeable`` false, or with its own wrapper class) cannot act
    through a weight: ``"all-linear"`` leaves those modules out of its candidates with a warning (before the
    method selects, as a method may record its selection), an explicit target raises ``TargetError`` naming
    the path."""
    weight_like = spec.mergeable and cls.layer_cls in (None, AdapterLayer)
    targets = getattr(config, "target_modules", None)
    if not weight_like and isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        hidden = {p: r[1] for p, _ in named if p and (r := read_by_parent(model, p))}
        if hidden:
            whys = "; ".join(sorted(set(hidden.values())))
            warnings.warn(f"{spec.name}: 'all-linear' skips {sorted(hidden)}: {whys}, and {spec.name} is not a "
                          "weight delta that could act through the weight", stacklevel=4)
            named = [(p, m) for p, m in named if p not in hidden]
    paths = cls.select_targets(model, named, config)
    read = {p: r for p in paths if (r := read_by_parent(model, p))}
    if not read:
        return paths, set()
    if not weight_like:
        path = sorted(read)[0]
        raise TargetError(
            f"{spec.name} cannot adapt {path!r}: {read[path][1]}, and {spec.name} is not a weight delta that could "
            f"act through the weight. Leave it out (exclude_modules=[{path!r}]) or use a weight-delta method "
            "(LoRA, IA3, LoHa, ...) there"
        )
    attention = sorted(p for p, (kind, _) in read.items() if kind is nn.MultiheadAttention)
    dropouts = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
                if f.name.endswith("dropout") and isinstance(getattr(config, f.name), (int, float))
                and getattr(config, f.name) > 0} if dataclasses.is_dataclass(config) else {}
    if attention and dropouts and not cls.has_own_effective_param():  # (OFT's own applies its dropout)
        warnings.warn(
            f"{spec.name}: {dropouts} is not applied on {attention}: nn.MultiheadAttention reads out_proj's weight "
            "instead of calling it, so the adapter acts there through its effective weight (as if merged)",
            stacklevel=4,
        )
    return paths, set(read)
