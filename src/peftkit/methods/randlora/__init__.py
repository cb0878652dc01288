"""RandLoRA: full-rank updates from shared random bases and trainable diagonal scalings."""

from .. import import_submodules

import_submodules(__name__, __path__)  # importing registers every method in the package

from .config import RandLoraConfig  # noqa: E402
from .layer import RandLoraAdapter  # noqa: E402

__all__ = ["RandLoraConfig", "RandLoraAdapter"]
