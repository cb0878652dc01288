"""Delta-LoRA: the frozen weight follows the delta of the low-rank product (arXiv 2309.02411)."""

from .. import import_submodules

import_submodules(__name__, __path__)  # importing registers the method

from .config import DeltaLoraConfig  # noqa: E402
from .layer import DeltaLoraAdapter, delta_lora_step  # noqa: E402

__all__ = ["DeltaLoraConfig", "DeltaLoraAdapter", "delta_lora_step"]
