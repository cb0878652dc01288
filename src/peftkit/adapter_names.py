"""Which strings may name an adapter: checked once, when an adapter is added or loaded."""

from __future__ import annotations

import unicodedata
from typing import Any

from torch import nn

BASE = "__base__"  # the adapter name that means "no adapter" in a mixed batch

NAME_RULE = ("adapter names are non-empty strings of at most 255 bytes in UTF-8, without '.', '/', '\\', ':' or "
             f"control characters, other than {BASE!r} and nn.ModuleDict's attribute names")


def check_adapter_name(name: Any) -> None:
    """Raise ``ValueError`` unless ``name`` can name an adapter (``NAME_RULE``).

    The rule is what the adapter storage and the saved layout accept: names key ``nn.ModuleDict``s (no ".", not
    empty, not one of its attributes such as "keys" or "training"), and ``save_pretrained`` writes adapter
    ``name`` (other than "default") into ``<folder>/<name>``, so a name is one portable folder name that cannot
    leave the folder: no path separator of either system, no ":" (a drive on Windows), no "." (so no "..", no
    hidden or temporary files), no control character, at most 255 bytes. "__base__" means "no adapter" in
    ``adapter_names``."""
    if not isinstance(name, str):
        raise ValueError(f"adapter_name {name!r}: not a str; {NAME_RULE}")
    if not name:
        raise ValueError(f"adapter_name '': empty; {NAME_RULE}")
    shown = repr(name) if len(name) <= 64 else repr(name[:64]) + f"... ({len(name)} characters)"
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(f"adapter_name {shown}: not encodable in UTF-8 (a lone surrogate); {NAME_RULE}") from None
    if size > 255:
        raise ValueError(f"adapter_name {shown}: {size} bytes in UTF-8; {NAME_RULE}")
    bad = sorted({c for c in name if c in "./\\:" or unicodedata.category(c) == "Cc"})
    if bad:
        raise ValueError(f"adapter_name {shown}: contains {', '.join(map(repr, bad))}; {NAME_RULE}")
    if name == BASE:
        raise ValueError(f"adapter_name {BASE!r} is reserved (adapter_names uses it for the base model); {NAME_RULE}")
    if hasattr(_MODULE_DICT, name):
        raise ValueError(f"adapter_name {shown}: an attribute of nn.ModuleDict, which holds the adapters; {NAME_RULE}")


_MODULE_DICT = nn.ModuleDict()  # probe for the names a ModuleDict refuses as keys (its attributes)
