"""Built-in methods: every module or package in this folder is imported, and importing registers it.

Adding a method is adding one module here with one ``@register_method``; nothing else lists methods. Each
subpackage imports its own modules the same way (``import_submodules``), so a module dropped into one
registers too.
"""

import importlib
import pkgutil
from collections.abc import Iterable


def import_submodules(package: str, path: Iterable[str]) -> None:
    """Import every module and subpackage of ``package`` (``path``: its ``__path__``), in name order."""
    for info in pkgutil.iter_modules(path):
        importlib.import_module(f"{package}.{info.name}")


import_submodules(__name__, __path__)
