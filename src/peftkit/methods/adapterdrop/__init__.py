"""AdapterDrop: bottleneck adapters dropped from the lowest transformer layers (arXiv 2010.11918)."""

from .. import import_submodules

import_submodules(__name__, __path__)  # importing registers the method

from .config import AdapterDropConfig  # noqa: E402
from .layer import AdapterDropAdapter  # noqa: E402

__all__ = ["AdapterDropConfig", "AdapterDropAdapter"]
