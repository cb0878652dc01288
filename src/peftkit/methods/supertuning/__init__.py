"""Super-Tuning (arXiv 2607.09287): magnitude-selected sparse entries of each weight, optionally plus LoRA."""

from .. import import_submodules

import_submodules(__name__, __path__)  # importing registers the method

from .config import SupertuningConfig  # noqa: E402
from .layer import SupertuningAdapter  # noqa: E402

__all__ = ["SupertuningConfig", "SupertuningAdapter"]
