"""LoRA-FA: LoRA with a frozen random down-projection A (arXiv 2308.03303)."""

from .. import import_submodules

import_submodules(__name__, __path__)  # importing registers the method

from .config import LoraFAConfig  # noqa: E402
from .layer import LoraFAAdapter  # noqa: E402

__all__ = ["LoraFAConfig", "LoraFAAdapter"]
