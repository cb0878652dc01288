"""peft's ``get_layer_status`` / ``get_model_status``: what each adapter layer holds, and a model summary.

Same fields and rules as peft 0.21 (``"irregular"`` where layers disagree). Two values read differently,
because peftkit has one wrapper and one tuner for every method: a layer's ``module_type`` is
``"<method>.<base layer class>"`` (``"lora.Linear"``, as peft's for a Linear base) and the model's
``adapter_model_type`` is ``"TunerModel"`` (peft: ``"LoraModel"``, ``"IA3Model"``, ...). Prompt methods are
reported too (peft refuses them: their adapters are not layers there).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Literal, Union

from torch import nn

from .layers import AdapterLayer
from .registry import list_methods
from .tuner import ModulesToSaveWrapper, TunerModel

__all__ = ["TunerLayerStatus", "TunerModelStatus", "get_layer_status", "get_model_status"]

Irregular = Literal["irregular"]
_BNB_BACKENDS = {"Linear4bit": "bnb 4bit", "Linear8bitLt": "bnb 8bit"}


@dataclasses.dataclass
class TunerLayerStatus:
    """One adapter layer (or trained-in-full module): peft's fields."""

    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, Union[bool, Irregular]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None


@dataclasses.dataclass
class TunerModelStatus:
    """The whole model: peft's fields."""

    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: Union[bool, Irregular]
    active_adapters: Union[list[str], Irregular]
    merged_adapters: Union[list[str], Irregular]
    requires_grad: dict[str, Union[bool, Irregular]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Union[str, None, Irregular]


def _agree(values: list) -> Union[bool, Irregular]:
    if all(v is True for v in values):
        return True
    if all(v is False for v in values):
        return False
    return "irregular"


def _method_name(adapter: nn.Module) -> str:
    """The registry name of an adapter's method (on a shared adapter class, the one named after its type)."""
    names = {}
    for spec in list_methods():
        if spec.adapter_cls is type(adapter) and (type(adapter) not in names or spec.name == spec.peft_type.lower()):
            names[type(adapter)] = spec.name
    return names.get(type(adapter), type(adapter).__name__)


def _module_type(module: nn.Module) -> str:
    if isinstance(module, ModulesToSaveWrapper):
        return "ModulesToSaveWrapper"
    methods = sorted({_method_name(a) for a in module.adapters.values()})
    return f"{'+'.join(methods) or type(module).__name__}.{type(module.base_layer).__name__}"


def _layer_status(name: str, module: nn.Module) -> TunerLayerStatus:
    if isinstance(module, AdapterLayer):
        parts = dict(module.adapters.items())
        active, merged = list(module.active_adapters), list(module.merged_adapters)
        base = module.base_layer
    else:  # ModulesToSaveWrapper
        parts = dict(module.modules_to_save.items())
        active = [module.active_adapter] if module.active_adapter in parts else []
        merged, base = [], module.original_module
    grads = {k: [p.requires_grad for p in m.parameters()] for k, m in parts.items()}
    return TunerLayerStatus(
        name=name,
        module_type=_module_type(module),
        enabled=not module.disable_adapters,
        active_adapters=active,
        merged_adapters=merged,
        requires_grad={k: _agree(v) for k, v in grads.items() if v},
        available_adapters=sorted(parts),
        devices={k: sorted({p.device.type for p in m.parameters()}) for k, m in parts.items()},
        quantization_backend=_BNB_BACKENDS.get(type(base).__name__),
    )


def _is_peft_model(model: nn.Module) -> bool:
    """A PeftModel: its ``base_model`` is the tuner (read by structure, so this module need not import it)."""
    return isinstance(getattr(model, "base_model", None), TunerModel)


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """The status of every adapter layer and trained-in-full module of a PeftModel (or a model with adapters
    injected by ``inject_adapter_in_model``). Raises ``ValueError`` when there is none."""
    root = model.base_model if _is_peft_model(model) else model
    out = [_layer_status(name, module) for name, module in root.named_modules()
           if isinstance(module, (AdapterLayer, ModulesToSaveWrapper))]
    if not out:
        raise ValueError(
            "No adapter layers found in the model, please ensure that it's a PEFT model or that you have PEFT adapters "
            "injected in the model."
        )
    return out


def _count(model: nn.Module) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """A summary over ``get_layer_status(model)``; ``"irregular"`` marks values the layers disagree on."""
    if _is_peft_model(model):
        base_model_type = type(model.get_base_model()).__name__
        trainable, total = model.get_nb_trainable_parameters()
        peft_types = {k: str(getattr(c.peft_type, "value", c.peft_type)) for k, c in model.peft_config.items()}
        adapter_model_type = type(model.base_model).__name__
    else:
        from transformers import PreTrainedModel

        base_model_type = type(model).__name__ if isinstance(model, PreTrainedModel) else "other"
        trainable, total = _count(model)
        peft_types, adapter_model_type = {}, "None"
    layers = get_layer_status(model)

    enabled_set = {s.enabled for s in layers}
    actives = {tuple(s.active_adapters) for s in layers}
    merged_all = set().union(*(s.merged_adapters for s in layers))
    merged: Union[list[str], Irregular] = sorted(merged_all)
    if any((set(s.available_adapters) - set(s.merged_adapters)) & merged_all for s in layers):
        merged = "irregular"
    grads: dict[str, list] = collections.defaultdict(list)
    devices: dict[str, list[str]] = collections.defaultdict(list)
    for s in layers:
        for k, v in s.requires_grad.items():
            grads[k].append(v)
        for k, v in s.devices.items():
            devices[k].extend(v)
    backends = {s.quantization_backend for s in layers}
    return TunerModelStatus(
        base_model_type=base_model_type,
        adapter_model_type=adapter_model_type,
        peft_types=peft_types,
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(layers),
        enabled=enabled_set.pop() if len(enabled_set) == 1 else "irregular",
        active_adapters=list(actives.pop()) if len(actives) == 1 else ("irregular" if actives else []),
        merged_adapters=merged,
        requires_grad={k: _agree(v) for k, v in grads.items()},
        available_adapters=sorted(set().union(*(s.available_adapters for s in layers))),
        devices={k: sorted(set(v)) for k, v in devices.items()},
        quantization_backend=backends.pop() if len(backends) == 1 else "irregular",
    )
