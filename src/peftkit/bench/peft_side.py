"""The Hugging Face PEFT side of ``--vs-peft``: imported lazily, only when asked for.

A method's counterpart is the peft config class with the same name as peftkit's config class (both
libraries share class and field names: ``LoraConfig``, ``IA3Config``, ``LNTuningConfig`` ...). Methods
peft does not have (BitFit, FISH mask, SSF ...) have no counterpart and are reported as such.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from ..registry import MethodSpec


class PeftMissingError(RuntimeError):
    """``--vs-peft`` without Hugging Face peft installed."""


def load_peft() -> ModuleType:
    """Import Hugging Face peft, or say how to install it."""
    try:
        import peft
    except ImportError as exc:
        raise PeftMissingError(
            "--vs-peft needs Hugging Face peft (pip install peft, or pip install 'peftkit[test]')"
        ) from exc
    return peft


def peft_config_class(peft: ModuleType, spec: MethodSpec) -> type | None:
    """peft's config class for ``spec`` (same class name), or None when peft lacks the method."""
    cls = getattr(peft, spec.config_cls.__name__, None)
    return cls if isinstance(cls, type) else None


def peft_model(peft: ModuleType, spec: MethodSpec, base: Any, kwargs: dict[str, Any]) -> Any:
    """``peft.get_peft_model(base, <Config>(**kwargs))``; raises LookupError when peft has no such method."""
    cls = peft_config_class(peft, spec)
    if cls is None:
        raise LookupError(f"peft {getattr(peft, '__version__', '?')} has no {spec.config_cls.__name__}")
    return peft.get_peft_model(base, cls(**kwargs))


def version(peft: ModuleType) -> str:
    return f"peft {getattr(peft, '__version__', '?')}"
