"""DeLoRA: decoupled low-rank adaptation (arXiv 2503.18225)."""

from .. import import_submodules

import_submodules(__name__, __path__)  # importing registers the method

from .config import DeloraConfig  # noqa: E402
from .layer import DeloraAdapter  # noqa: E402

__all__ = ["DeloraConfig", "DeloraAdapter"]
