"""Adapters that one method's config adds of another method (peft's auxiliary training wrappers).

A method declares ``Adapter.auxiliary_field``: the config field of other methods through which they ask for it
(trainable tokens: ``LoraConfig.trainable_token_indices``). ``TunerModel.inject`` builds those adapters with
the injecting config, under the same adapter name, in its build-before-change phase (``build``), and after
attaching every layer lets each method involved link its layers (``Adapter.after_inject``). The engine reads
the registry only: it imports no method family.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .layers import AdapterLayer
from .registry import list_methods


def build(model: nn.Module, named: list[tuple[str, nn.Module]], config: Any, own_cls: type, own_paths: list[str],
          init: bool) -> tuple[list[tuple[str, nn.Module, nn.Module]], list[type]]:
    """(path, base, adapter) of every auxiliary adapter ``config`` asks for, and their classes. Raises (before
    any change) when one would sit on a module the method itself wraps."""
    built: list[tuple[str, nn.Module, nn.Module]] = []
    classes: list[type] = []
    modules = dict(named)
    for spec in list_methods():
        aux = spec.adapter_cls
        field = aux.auxiliary_field
        if not field or aux is own_cls or isinstance(config, spec.config_cls) or getattr(config, field, None) is None:
            continue
        paths = aux.select_targets(model, named, config)
        clash = sorted(set(paths) & set(own_paths))
        if clash:
            raise ValueError(f"{type(config).__name__}.{field}: {clash[0]!r} is also in target_modules; a layer may "
                             f"carry the {spec.name} of {field} or the method's own adapter, not both")
        for path in paths:
            base = modules[path] if path in modules else model.get_submodule(path)
            if isinstance(base, AdapterLayer):
                base = base.base_layer
            built.append((path, base, aux(base, config, path, init=init)))
        classes.append(aux)
    return built, classes
