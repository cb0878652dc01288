"""The LoRA family: LoRA, rsLoRA, DoRA, PiSSA / OLoRA initialisation (options of one method)."""

from .. import import_submodules

import_submodules(__name__, __path__)  # importing registers every method in the package

from .config import LoraConfig  # noqa: E402
from .layer import LoraAdapter  # noqa: E402

__all__ = ["LoraConfig", "LoraAdapter"]
