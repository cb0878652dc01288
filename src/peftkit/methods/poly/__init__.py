"""Polytropon / Multi-Head Routing: per-task routing over an inventory of LoRA skills (arXiv 2202.13914,
2211.03831)."""

from .. import import_submodules

import_submodules(__name__, __path__)  # importing registers the method

from .config import PolyConfig  # noqa: E402
from .layer import PolyAdapter  # noqa: E402

__all__ = ["PolyConfig", "PolyAdapter"]
