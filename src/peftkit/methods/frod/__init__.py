"""FRoD: a shared full-rank basis per module category with sparse learnable rotations (AAAI-26)."""

from .. import import_submodules

import_submodules(__name__, __path__)  # importing registers the method

from .config import FrodConfig  # noqa: E402
from .layer import FrodAdapter  # noqa: E402

__all__ = ["FrodConfig", "FrodAdapter"]
