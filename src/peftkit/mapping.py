"""peft's config lookup: ``PEFT_TYPE_TO_CONFIG_MAPPING`` and ``get_peft_config``, read from the registry.

The mapping is built once, when peftkit is imported, from every registered method (peft's methods and
peftkit's own). Two peftkit methods share the type ``PREFIX_TUNING`` (prefix tuning and P-tuning v2, a
prefix-tuning config subclass); the key maps to ``PrefixTuningConfig``, as in peft.
"""

from __future__ import annotations

from typing import Any

from .config import PeftConfig
from .peft_types import PeftType
from .registry import list_methods

_MEMBERS = {m.value for m in PeftType}

__all__ = ["PEFT_TYPE_TO_CONFIG_MAPPING", "get_peft_config"]


def _config_mapping() -> dict[PeftType | str, type[PeftConfig]]:
    """PeftType -> config class of every registered method; on a shared type the method named after it wins.

    A method whose type has no ``PeftType`` member (a new one) is keyed by its string, which looks up the
    same way (``tests/test_public_api.py`` asks for the member)."""
    out: dict[PeftType | str, type[PeftConfig]] = {}
    for spec in list_methods():
        key: PeftType | str = PeftType(spec.peft_type) if spec.peft_type in _MEMBERS else spec.peft_type
        if key not in out or spec.name == str(spec.peft_type).lower():
            out[key] = spec.config_cls
    return out


PEFT_TYPE_TO_CONFIG_MAPPING: dict[PeftType | str, type[PeftConfig]] = _config_mapping()


def get_peft_config(config_dict: dict[str, Any]) -> PeftConfig:
    """Build the config class named by ``config_dict["peft_type"]`` from the dict (peft's function).

    ``peft_type`` may be a string or a ``PeftType``. Keys the config class does not know warn and are
    ignored (peft raises ``TypeError`` for them); a type peftkit does not implement raises ``KeyError``.
    """
    peft_type = config_dict["peft_type"]
    key = getattr(peft_type, "value", peft_type)
    try:
        cls = PEFT_TYPE_TO_CONFIG_MAPPING[key]
    except (KeyError, TypeError):
        raise KeyError(
            f"peft_type {peft_type!r} is not implemented by peftkit; implemented: "
            f"{sorted(str(getattr(k, 'value', k)) for k in PEFT_TYPE_TO_CONFIG_MAPPING)}"
        ) from None
    return cls.from_dict({**config_dict, "peft_type": key}, source="get_peft_config")
