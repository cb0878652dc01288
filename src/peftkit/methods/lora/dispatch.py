"""Which adapter class LoRA builds on a base module that is not a plain Linear / Embedding / Conv.

Two sources, checked in peft's order (``LoraModel._create_new_module``: the user's mapping first):

- ``LoraConfig._register_custom_module({LayerType: AdapterClass})`` (peft's experimental API): a module of
  ``LayerType`` (``isinstance``) gets ``AdapterClass(base, config, key, init=init)``. In peftkit the class is
  an ``Adapter`` subclass (usually of ``LoraAdapter``: its math on the base module, ``forward(base, x, out)``
  and ``merge`` / ``delta_weight``), with an optional ``layer_cls`` (its wrapper, an ``AdapterLayer``
  subclass) when the base is not called as ``base(x)``. peft takes a subclass of its own ``LoraLayer`` there,
  a whole replacement module; such a class is refused with what to write instead.
- built in (``BUILTIN``, filled by the defining modules): ``nn.MultiheadAttention`` (LoRA on its packed
  in-projection and its out_proj, as peft's ``lora.MultiheadAttention``: ``methods/lora/mha.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from torch import nn

from ...adapter import Adapter
from ...targeting import find_targets
from .params import selects_modules


# built-in base types LoRA adapts with an adapter class of their own; filled by the modules that define those
# classes when the LoRA package is imported (mha.py: nn.MultiheadAttention), so this module imports none of them
BUILTIN: dict[type, type] = {}
# LoRA variants a config field selects on any base, field -> adapter class (alora.py: ``alora_invocation_tokens``),
# and the per-call hooks they need around a forward / generate (``call_context``); filled by their modules too
BY_FIELD: dict[str, type] = {}
CALL_HOOKS: list[Callable[[Any, dict[str, Any]], Any]] = []
# model-level rules and steps of variants (kasa.py: no KaSA beside plain LoRA; the base weight's truncation once
# every layer of a new adapter is built, so a refused target leaves the model untouched)
NEW_ADAPTER_CHECKS: list[Callable[[dict[str, Any], Any, str], None]] = []
AFTER_INJECT: list[Callable[[nn.Module, str], None]] = []


class VariantHooks:
    """``LoraAdapter``'s model-level hooks (``Adapter.check_new_adapter`` / ``after_inject``), run for the
    variants that registered one above."""

    @classmethod
    def check_new_adapter(cls, configs: dict[str, Any], config: Any, adapter_name: str) -> None:
        for check in NEW_ADAPTER_CHECKS:
            check(configs, config, adapter_name)

    @classmethod
    def after_inject(cls, model: nn.Module, adapter_name: str) -> None:
        for step in AFTER_INJECT:
            step(model, adapter_name)


def custom_modules(config: Any) -> dict[type, type]:
    return dict(getattr(config, "_custom_modules", None) or {})


def register_custom_module(config: Any, mapping: dict[type, type]) -> None:
    """``LoraConfig._register_custom_module``: checked here, so a wrong class fails at registration."""
    if not isinstance(mapping, dict):
        raise TypeError(f"_register_custom_module: expected a dict {{layer type: adapter class}}, got {mapping!r}")
    for layer_type, adapter_cls in mapping.items():
        if not (isinstance(layer_type, type) and issubclass(layer_type, nn.Module)):
            raise TypeError(f"_register_custom_module: key {layer_type!r} is not an nn.Module subclass")
        if not (isinstance(adapter_cls, type) and issubclass(adapter_cls, Adapter)):
            raise TypeError(
                f"_register_custom_module: {getattr(adapter_cls, '__name__', adapter_cls)!r} for "
                f"{layer_type.__name__} is not a peftkit Adapter subclass. peftkit takes the adapter's math, not a "
                "whole replacement layer: subclass peftkit.LoraAdapter (or peftkit's Adapter), built as "
                "Cls(base, config, key, init=True), with forward(base, x, out) and merge / delta_weight; see "
                "docs/compatibility.md, 'Custom layer types'")
    if getattr(config, "_custom_modules", None) is None:
        object.__setattr__(config, "_custom_modules", {})
    config._custom_modules.update(mapping)


def adapter_cls_for(base: Any, config: Any) -> type | None:
    """The adapter class for ``base`` when it is not LoRA's own (None: ``LoraAdapter``)."""
    if not isinstance(base, nn.Module):
        return None
    for layer_type, adapter_cls in custom_modules(config).items():
        if isinstance(base, layer_type):
            return adapter_cls
    for field, adapter_cls in BY_FIELD.items():  # a variant refuses the bases it cannot adapt
        if getattr(config, field, None) not in (None, False):  # use_qalora is a flag
            return adapter_cls
    for layer_type, adapter_cls in BUILTIN.items():
        if isinstance(base, layer_type):
            return adapter_cls
    return None


def call_context(model: Any, call: dict[str, Any]) -> Any:
    """``LoraAdapter.call_context``: the variants' per-call contexts (``CALL_HOOKS``), None when none applies."""
    contexts = [c for c in (hook(model, call) for hook in CALL_HOOKS) if c is not None]
    if len(contexts) <= 1:
        return contexts[0] if contexts else None
    return _entered_together(contexts)


@contextlib.contextmanager
def _entered_together(contexts: list[Any]) -> Any:
    with contextlib.ExitStack() as stack:
        for context in contexts:
            stack.enter_context(context)
        yield


def select_targets(cls: type, model: nn.Module, named: list[tuple[str, nn.Module]], config: Any,
                   extra: bool) -> list[str]:
    """``find_targets`` with the registered layer types (and ``nn.MultiheadAttention``) allowed when ``extra``.
    A targeted attention's own out_proj is adapted with it (as peft): not a target of its own then."""
    types = tuple(custom_modules(config)) + (nn.MultiheadAttention,) if extra else ()
    if getattr(config, "target_parameters", None) and not selects_modules(
            model, named, config, cls.default_roles, cls.supported_layers + types):
        return []  # LoRA on named parameters only (params.py)
    found = find_targets(model, named, config, cls.default_roles, cls.supported_layers + types)
    modules = dict(named)
    custom = tuple(custom_modules(config))
    attention = {p for p in found if isinstance(modules[p], nn.MultiheadAttention)
                 and not (custom and isinstance(modules[p], custom))}
    return [p for p in found if p.rpartition(".")[0] not in attention]
