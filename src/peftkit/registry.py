"""The one registration point for methods.

A method is one module that defines a config class and an adapter class and decorates the adapter with
``@register_method``. Tests, docs, the CLI and the benchmark discover methods here; nothing else keeps a
list of them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from .config import PeftConfig, set_config_lookup


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """What the registry knows about a method (the survey's Table 1 columns, plus how to build it)."""

    name: str
    config_cls: type[PeftConfig]
    adapter_cls: type
    category: str  # "reparameterized" | "additive" | "prompt" | "selective" | "hybrid"
    modalities: tuple[str, ...]
    mergeable: bool
    param_formula: str  # trainable parameters per targeted module, in the paper's notation
    position: str = "weight"  # where the trained parameters sit
    changes_structure: bool = False
    # the adapted model's output equals the base model's right after get_peft_model (False for methods
    # whose learned tokens or blends act from the start, e.g. prompt tuning, VPT)
    starts_at_base: bool = True
    paper: str = ""
    # named example configs (kwargs for config_cls) that the contract suite and the benchmark run
    examples: tuple[tuple[str, dict[str, Any]], ...] = ()

    @property
    def peft_type(self) -> str:
        return self.config_cls.PEFT_TYPE

    @property
    def inference_overhead(self) -> str:
        return "none once merged" if self.mergeable else "extra compute per forward"


_METHODS: dict[str, MethodSpec] = {}

CATEGORIES = ("selective", "additive", "prompt", "reparameterized", "hybrid")
MODALITIES = ("text", "vision", "vision-language", "generation")


def register_method(
    name: str,
    *,
    config: type[PeftConfig],
    category: str,
    modalities: tuple[str, ...],
    mergeable: bool,
    param_formula: str,
    **meta: Any,
) -> Callable[[type], type]:
    """Class decorator: register ``adapter_cls`` as method ``name`` configured by ``config``."""
    if name != name.lower():
        raise ValueError(f"method names are lowercase, got {name!r}")
    if category not in CATEGORIES:
        raise ValueError(f"{name}: category must be one of {CATEGORIES}, got {category!r}")
    bad = set(modalities) - set(MODALITIES)
    if bad:
        raise ValueError(f"{name}: unknown modalities {sorted(bad)}; expected a subset of {MODALITIES}")
    if "examples" in meta:
        meta["examples"] = tuple((k, dict(v)) for k, v in meta["examples"].items())

    def decorate(adapter_cls: type) -> type:
        if name in _METHODS and _METHODS[name].adapter_cls is not adapter_cls:
            raise ValueError(f"method {name!r} is already registered by {_METHODS[name].adapter_cls.__name__}")
        _METHODS[name] = MethodSpec(
            name=name,
            config_cls=config,
            adapter_cls=adapter_cls,
            category=category,
            modalities=tuple(modalities),
            mergeable=mergeable,
            param_formula=param_formula,
            **meta,
        )
        return adapter_cls

    return decorate


def _load_builtin_methods() -> None:
    # late by necessity: every method module imports this one to register itself
    from . import methods  # noqa: F401  (importing registers every built-in method)


def get_method(key: str | PeftConfig) -> MethodSpec:
    """Look a method up by registry name (``"lora"``), PEFT type (``"LORA"``) or config instance.

    Several methods may share a PEFT type: a preset whose config class inherits its parent's ``PEFT_TYPE``
    (P-tuning v2 saves as ``PREFIX_TUNING``). The type then names the method whose config class declares it
    (prefix tuning), whatever the import order; a name always wins over a type."""
    _load_builtin_methods()
    if isinstance(key, PeftConfig):
        for spec in _METHODS.values():
            if type(key) is spec.config_cls:
                return spec
        key = str(key.peft_type)
    if key in _METHODS:
        return _METHODS[key]
    typed = [spec for spec in _METHODS.values() if key.upper() == spec.peft_type]
    if typed:
        return next((spec for spec in typed if "PEFT_TYPE" in vars(spec.config_cls)), typed[0])
    raise KeyError(f"unknown method {key!r}; registered: {sorted(_METHODS)}")


def list_methods() -> list[MethodSpec]:
    """Every registered method with its metadata, sorted by name."""
    _load_builtin_methods()
    return [_METHODS[k] for k in sorted(_METHODS)]


set_config_lookup(lambda peft_type: get_method(peft_type).config_cls)  # PeftConfig.from_dict on the base class
