"""MoLE: a learned layer-wise gate over several LoRA experts (arXiv 2404.13628)."""

from .. import import_submodules

import_submodules(__name__, __path__)  # importing registers the method

from .config import MoleConfig  # noqa: E402
from .layer import MoleAdapter  # noqa: E402

__all__ = ["MoleConfig", "MoleAdapter"]
