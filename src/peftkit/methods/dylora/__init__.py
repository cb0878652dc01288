"""DyLoRA: LoRA trained at a random rank each step, usable at any rank up to r (arXiv 2210.07558)."""

from .. import import_submodules

import_submodules(__name__, __path__)  # importing registers the method

from .config import DyLoraConfig  # noqa: E402
from .layer import DyLoraAdapter, set_rank  # noqa: E402

__all__ = ["DyLoraConfig", "DyLoraAdapter", "set_rank"]
