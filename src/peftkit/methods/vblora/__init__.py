"""VB-LoRA: low-rank factors assembled from a shared vector bank (top-k mixtures of its vectors)."""

from .. import import_submodules

import_submodules(__name__, __path__)  # importing registers the method

from .config import VBLoRAConfig  # noqa: E402
from .layer import VBLoRAAdapter  # noqa: E402

__all__ = ["VBLoRAConfig", "VBLoRAAdapter"]
