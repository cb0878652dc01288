"""The modules that stand for ``peft`` and the submodules the tools import, built from peftkit's objects.

Each entry of :data:`FACADES` lists what one module holds. Names are looked up when first read, so the
facade of ``peft`` offers every public name of peftkit. What a tool imports and peftkit lacks raises
``ImportError`` / ``AttributeError`` naming it; nothing is a stub.

Layer classes: peft has a layer class per method (``LoraLayer``, ``LoHaLayer`` ...); peftkit has one wrapper,
:class:`~peftkit.layers.AdapterLayer`. ``isinstance(module, LoraLayer)`` holds for a wrapper that carries a
LoRA adapter, and ``BaseTunerLayer`` is the wrapper itself.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

from torch import nn

import peftkit
from peftkit import checkpoint as ckpt
from peftkit import helpers
from peftkit import mixed_model as mixed_mod
from peftkit import model as model_mod
from peftkit.layers import AdapterLayer
from peftkit.methods.lora.intruders import reduce_intruder_dimension
from peftkit.methods.lycoris.functional import factorization
from peftkit.tuner import ModulesToSaveWrapper, TunerModel

PEFT_API_VERSION = "0.21.2"  # the peft release whose API, files and numerics peftkit follows

from .weight_mapping import build_peft_weight_mapping, inject_adapter_in_model


class _MethodLayerMeta(type):
    def __instancecheck__(cls, obj: Any) -> bool:
        return isinstance(obj, AdapterLayer) and any(
            type(a).__name__ in cls._adapter_names for a in obj.adapters.values()  # type: ignore[attr-defined]
        )

    def __subclasscheck__(cls, sub: type) -> bool:
        return False


def _method_layer(name: str, *adapter_names: str) -> type:
    """``isinstance(m, <name>)``: ``m`` is a peftkit wrapper holding one of these adapter classes."""
    return _MethodLayerMeta(name, (), {"_adapter_names": adapter_names, "__doc__": f"peft's {name}, for isinstance"})


LoraLayer = _method_layer("LoraLayer", "LoraAdapter")
LoHaLayer = _method_layer("LoHaLayer", "LoHaAdapter")
LoKrLayer = _method_layer("LoKrLayer", "LoKrAdapter")


class _NeverMeta(type):
    def __instancecheck__(cls, obj: Any) -> bool:
        return False


class AuxiliaryTrainingWrapper(metaclass=_NeverMeta):
    """peft's base of wrappers whose file keys transformers renames one by one. peftkit's saved-module keys
    are renamed with the adapter's (weight_mapping.py), so no module is one of these."""


def _get_submodules(model: nn.Module, key: str) -> tuple[nn.Module, nn.Module, str]:
    """(parent, module, last name) of the module at ``key`` (peft.utils._get_submodules)."""
    parent = model.get_submodule(".".join(key.split(".")[:-1]))
    target_name = key.split(".")[-1]
    return parent, model.get_submodule(key), target_name


def delete_adapter(model: nn.Module, adapter_name: str, prefix: str | None = None, layer_cls: type = AdapterLayer) -> list[str] | None:
    """Remove ``adapter_name`` from a model with injected adapters (peft.functional.delete_adapter)."""
    tuner = model_mod.tuner_of(model)
    tuner.delete(adapter_name)
    return list(tuner.active_adapters) or None


def _public() -> dict[str, Any]:
    return {name: getattr(peftkit, name) for name in peftkit.__all__}


_STATE = {"get_peft_model_state_dict": model_mod.get_peft_model_state_dict,
          "set_peft_model_state_dict": model_mod.set_peft_model_state_dict}
_MODELS = {"PeftModel": model_mod.PeftModel, "PeftMixedModel": peftkit.PeftMixedModel,
           **{n: getattr(model_mod, n) for n in dir(model_mod) if n.startswith("PeftModelFor")}}
_UTILS = {**_STATE, "ModulesToSaveWrapper": ModulesToSaveWrapper, "AuxiliaryTrainingWrapper": AuxiliaryTrainingWrapper,
          "_get_submodules": _get_submodules}
_LORA = {"LoraConfig": peftkit.LoraConfig, "LoraModel": TunerModel, "LoraLayer": LoraLayer}
# LoRA's data-driven initialisations (methods/lora/eva.py, corda.py, loraga.py, init_configs.py)
_LORA_INIT_CONFIGS = {n: getattr(peftkit, n) for n in ("EvaConfig", "CordaConfig", "LoraGAConfig", "KasaConfig",
                                                        "LoraRuntimeConfig", "VeloraConfig", "MontecloraConfig",
                                                        "BdLoraConfig", "ArrowConfig")}
_LORA_INITS = {**_LORA_INIT_CONFIGS, **{n: getattr(peftkit, n) for n in (
    "get_eva_state_dict", "initialize_lora_eva_weights", "preprocess_loraga", "create_arrow_model")}}

# module name -> names it holds (a callable is called when the module is built)
FACADES: dict[str, dict[str, Any] | Callable[[], dict[str, Any]]] = {
    "peft": lambda: {**_public(), **_MODELS, "inject_adapter_in_model": inject_adapter_in_model},
    "peft.peft_model": _MODELS,
    "peft.mixed_model": {"PeftMixedModel": peftkit.PeftMixedModel},
    "peft.tuners.mixed": {"MixedModel": mixed_mod.MixedModel, "COMPATIBLE_TUNER_TYPES": mixed_mod.COMPATIBLE_TUNER_TYPES},
    "peft.config": {"PeftConfig": peftkit.PeftConfig, "PromptLearningConfig": peftkit.PromptLearningConfig},
    "peft.mapping": lambda: {"get_peft_model": peftkit.get_peft_model,
                             "inject_adapter_in_model": inject_adapter_in_model},
    "peft.mapping_func": lambda: {"get_peft_model": peftkit.get_peft_model},
    "peft.tuners": lambda: {n: v for n, v in _public().items() if n.endswith(("Config", "Model"))},
    "peft.tuners.tuners_utils": {"BaseTunerLayer": AdapterLayer, "BaseTuner": TunerModel},
    "peft.tuners.lora": {**_LORA, **_LORA_INITS},
    "peft.tuners.lora.layer": _LORA,
    "peft.tuners.lora.config": {**_LORA, **_LORA_INIT_CONFIGS},
    "peft.tuners.lora.eva": {n: _LORA_INITS[n] for n in ("get_eva_state_dict", "initialize_lora_eva_weights")},
    "peft.tuners.lora.corda": {"preprocess_corda": peftkit.preprocess_corda, "CordaConfig": peftkit.CordaConfig},
    "peft.tuners.lora.loraga": {"preprocess_loraga": peftkit.preprocess_loraga},
    "peft.tuners.lora.model": _LORA,
    "peft.tuners.lora.intruders": {"reduce_intruder_dimension": reduce_intruder_dimension},
    "peft.tuners.lora.arrow": lambda: {"ArrowConfig": peftkit.ArrowConfig, "create_arrow_model": peftkit.create_arrow_model},
    "peft.tuners.loha": {"LoHaConfig": peftkit.LoHaConfig, "LoHaLayer": LoHaLayer},
    "peft.tuners.loha.layer": {"LoHaLayer": LoHaLayer},
    "peft.tuners.lokr": {"LoKrConfig": peftkit.LoKrConfig, "LoKrLayer": LoKrLayer},
    "peft.tuners.lokr.layer": {"LoKrLayer": LoKrLayer, "factorization": factorization},
    "peft.utils": lambda: {**_UTILS, "TaskType": peftkit.TaskType,
                           **({"PeftType": peftkit.PeftType} if hasattr(peftkit, "PeftType") else {})},
    "peft.utils.other": _UTILS,
    "peft.utils.save_and_load": _STATE,
    "peft.utils.transformers_weight_conversion": {"build_peft_weight_mapping": build_peft_weight_mapping},
    "peft.functional": {"delete_adapter": delete_adapter, "inject_adapter_in_model": inject_adapter_in_model,
                        **_STATE},
    "peft.import_utils": {},
    "peft.helpers": {n: getattr(helpers, n) for n in ("check_if_peft_model", "disable_input_dtype_casting",
                                                       "rescale_adapter_scale")},
    "peft.utils.hotswap": lambda: {n: getattr(peftkit.hotswap, n) for n in peftkit.hotswap.__all__},
    "peft.utils.constants": {"SAFETENSORS_WEIGHTS_NAME": ckpt.SAFETENSORS_NAME, "WEIGHTS_NAME": ckpt.LEGACY_NAME,
                             "CONFIG_NAME": "adapter_config.json"},
}


def build_module(fullname: str) -> types.ModuleType:
    """A new module ``fullname`` holding the names :data:`FACADES` lists for it."""
    entry = FACADES[fullname]
    names = entry() if callable(entry) else dict(entry)
    module = types.ModuleType(fullname, f"peftkit's counterpart of {fullname} (see peftkit.compat)")
    module.__dict__.update(names)
    module.__path__ = []  # a package: the finder answers its submodules
    module.__all__ = sorted(n for n in names if not n.startswith("_"))

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(f"module {fullname!r} (served by peftkit) has no attribute {name!r}: "
                             "peftkit has no counterpart of it")

    module.__getattr__ = __getattr__  # type: ignore[attr-defined]
    if fullname == "peft":
        module.__version__ = PEFT_API_VERSION
    return module


def facade_names() -> list[str]:
    """The modules served (for the docs and tests)."""
    return sorted(FACADES)


__all__ = ["FACADES", "build_module", "facade_names"]
