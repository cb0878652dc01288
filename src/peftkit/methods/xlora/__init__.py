"""X-LoRA: a token-level mixture of frozen LoRA experts (arXiv 2402.07148)."""

from .. import import_submodules

import_submodules(__name__, __path__)  # importing registers the method

from .config import XLoraConfig  # noqa: E402
from .layer import XLoraAdapter  # noqa: E402

__all__ = ["XLoraConfig", "XLoraAdapter"]
