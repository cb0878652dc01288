"""Built-in methods: every module or package in this folder is imported, and importing registers it.

Adding a method is adding one module here with one ``@register_method``; nothing else lists methods.
"""

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")
