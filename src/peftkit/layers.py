"""The one wrapper around a base layer, shared by every weight-delta method.

``AdapterLayer`` holds named adapters on one base module and owns the mechanics: which adapters are active,
disabling, merging into and unmerging from the base weight (with the optional NaN check of a safe merge)
and exact restoration of the base weight on unmerge. An ``Adapter`` supplies only its math.

Exact unmerge: floating-point ``(W + d) - d`` is not always ``W``. At merge time the wrapper records the
entries where the method's own unmerge would not give back the original weight, and their exact
corrections (a difference of two neighbouring floats is exact, Sterbenz). The record is sparse: for a
delta that is small next to ``W`` almost every entry round-trips already. Unmerge then restores the base
weight bit for bit, provided the adapter's parameters did not change while merged.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from . import routing as _routing
from .adapter import Adapter
from .peft_surface import PeftLayerSurface
from .quant import merge_quantized, unmerge_quantized


class SharedState(nn.Module):
    """One adapter's shared tensors as frozen buffers; layers hold a reference, never a copy."""

    def __init__(self, tensors: dict[str, Tensor]) -> None:
        super().__init__()
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor)

    def tensors(self) -> dict[str, Tensor]:
        return dict(self.named_buffers())


class _Created:
    """Restore record of a base parameter a merge created (``Adapter.missing_param``); ``registered``: the
    base had the name registered as None (e.g. ``nn.Linear(bias=False)``), to which unmerge returns it."""

    def __init__(self, registered: bool) -> None:
        self.registered = registered


class AdapterLayer(PeftLayerSurface, nn.Module):
    """A base layer plus named adapters. Attribute reads it does not know fall through to the base layer,
    after peft's names for the adapters' tensors (``lora_A``, ``lora_B`` ...: see ``peft_surface.py``)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        self._restore: dict[str, dict[str, tuple[Any, Tensor | None, Tensor | None]]] = {}

    @property
    def routing(self) -> list[str] | None:
        """Per-row adapter names of the mixed batch (``adapter_names``) this thread is running through this
        layer, None outside one. Read-only: ``TunerModel.route`` sets it for the calling thread only
        (``routing.routed``), never on the layer, which other threads share."""
        return _routing.names_for(self)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            try:  # the base layer's attributes first: model code reads .weight / .in_features on hot paths
                return getattr(self.base_layer, name)
            except AttributeError:
                view = self._peft_view(name)
                if view is None:
                    raise
                return view

    # -- forward ---------------------------------------------------------------------------------------
    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.disable_adapters:
            if self.merged_adapters:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if _routing.ANY:  # some call routes somewhere: is it this one, through this layer?
            names = _routing.names_for(self)
            if names is not None:
                return _routing.routed_forward(self, names, x, *args, **kwargs)
        pending = [n for n in self.active_adapters if n not in self.merged_adapters]
        if len(pending) == 1 and not args and not kwargs:
            fused = self.adapters[pending[0]].fused_forward(self.base_layer, x)
            if fused is not None:
                return fused
        out = self.base_layer(x, *args, **kwargs)
        for name in pending:
            adapter = self.adapters[name]
            if adapter.changes_output:
                out = adapter(self.base_layer, x, out)
        return out

    # -- adapters --------------------------------------------------------------------------------------
    def add(self, name: str, adapter: Adapter) -> None:
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        self.adapters[name] = adapter

    def remove(self, name: str) -> None:
        if name in self.merged_adapters:
            self.unmerge([name])
        del self.adapters[name]
        if name in self.active_adapters:
            self.active_adapters.remove(name)

    def set_active(self, names: list[str]) -> None:
        self.active_adapters = [n for n in names if n in self.adapters]

    # -- merge / unmerge -------------------------------------------------------------------------------
    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold adapters into the base parameters (in place, so tied weights stay tied)."""
        names = self.active_adapters if adapter_names is None else adapter_names
        self.check_merge(names)
        base = self.base_layer
        if _quantized(base):  # dequantize, merge, re-quantize and report the error (peftkit.quant)
            merge_quantized(self, list(names), safe_merge)
            return
        for name in names:
            if name not in self.adapters:
                continue
            if name in self.merged_adapters:
                warnings.warn(f"adapter {name!r} is already merged; skipping", stacklevel=3)
                continue
            adapter = self.adapters[name]
            staged = []  # everything is computed (and checked) before any parameter changes
            created: dict[str, _Created] = {}
            for pname in adapter.merged_params:
                param = getattr(base, pname, None)
                if param is None:
                    neutral = adapter.missing_param(base, pname)
                    if neutral is None:
                        continue
                    param = nn.Parameter(neutral, requires_grad=False)  # added below, removed on unmerge
                    created[pname] = _Created(pname in base._parameters)
                original = param.detach().clone()
                merged, state = adapter.merge(base, original) if pname == "weight" else (
                    adapter.merge_param(base, pname, original), None)
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(f"merging adapter {name!r} would put NaN/inf into {pname}; nothing merged")
                staged.append((pname, param, original, merged, state))
            records = {}
            for pname, param, original, merged, state in staged:
                if pname in created:
                    setattr(base, pname, param)
                    records[pname] = (created[pname], None, None)
                param.copy_(merged)
            for pname, param, original, _, state in staged:
                if pname in records:
                    continue
                # exact-restore record: where the method's unmerge misses the original, and by how much
                err = (original - self._unmerge_param(adapter, pname, param.detach(), state)).reshape(-1)
                idx = err.nonzero().squeeze(1)
                records[pname] = (state, idx, err[idx]) if idx.numel() else (state, None, None)
            self._restore[name] = records
            self.merged_adapters.append(name)

    def check_merge(self, adapter_names: list[str] | None = None) -> None:
        """Raise before anything changes if an adapter a merge of ``adapter_names`` (None: the active ones) would
        fold in refuses it (``Adapter.check_merge``: aLoRA)."""
        for name in self.active_adapters if adapter_names is None else adapter_names:
            if name in self.adapters and name not in self.merged_adapters:
                self.adapters[name].check_merge(self.base_layer)

    def _unmerge_param(self, adapter: Adapter, pname: str, value: Tensor, state: Any) -> Tensor:
        if pname == "weight":
            return adapter.unmerge(self.base_layer, value, state)
        return adapter.unmerge_param(self.base_layer, pname, value)

    @torch.no_grad()
    def unmerge(self, adapter_names: list[str] | None = None) -> None:
        """Undo merges, most recent first; restores the base parameters bit for bit."""
        names = list(self.merged_adapters) if adapter_names is None else adapter_names
        if _quantized(self.base_layer):
            return unmerge_quantized(self, names)
        for name in reversed(list(self.merged_adapters)):
            if name not in names:
                continue
            if self.merged_adapters[-1] != name:
                raise RuntimeError(f"unmerge {self.merged_adapters[-1]!r} before {name!r} (merges undo in reverse)")
            for pname, (state, idx, vals) in self._restore.pop(name).items():
                if isinstance(state, _Created):  # the merge added this parameter: take it away again
                    if state.registered:
                        self.base_layer.register_parameter(pname, None)
                    else:
                        delattr(self.base_layer, pname)
                    continue
                param = getattr(self.base_layer, pname)
                restored = self._unmerge_param(self.adapters[name], pname, param.detach(), state)
                if idx is not None:
                    restored.view(-1).index_add_(0, idx, vals)
                param.copy_(restored)
            self.merged_adapters.pop()

    def extra_repr(self) -> str:
        return f"active={self.active_adapters}, merged={self.merged_adapters}"


def _quantized(base: nn.Module) -> bool:
    """A bitsandbytes 4-/8-bit base (its weight is packed; see peftkit.quant)."""
    return type(getattr(base, "weight", None)).__name__ in ("Params4bit", "Int8Params")


def adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    """Every wrapper in ``model`` with its path, in ``named_modules`` order.

    The walk does not enter a wrapper's adapters (only its base layer), so it costs the same however
    many adapters are loaded (``named_modules`` would visit every adapter of every layer).
    """
    out: list[tuple[str, AdapterLayer]] = []
    seen: set[int] = set()

    def walk(prefix: str, module: nn.Module) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        if isinstance(module, AdapterLayer):
            out.append((prefix, module))
            children = [("base_layer", module.base_layer)]
        else:
            children = module._modules.items()
        for name, child in children:
            if child is not None:
                walk(f"{prefix}.{name}" if prefix else name, child)

    walk("", model)
    return out
