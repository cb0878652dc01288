"""DeFT: decompositional efficient fine-tuning, projection + low-rank injection (NeurIPS 2025)."""

from .. import import_submodules

import_submodules(__name__, __path__)  # importing registers the method

from .config import DeftConfig  # noqa: E402
from .layer import DeftAdapter  # noqa: E402

__all__ = ["DeftConfig", "DeftAdapter"]
