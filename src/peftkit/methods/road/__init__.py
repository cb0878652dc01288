"""RoAd: 2D rotary adaptation (arXiv 2409.00119)."""

from .. import import_submodules

import_submodules(__name__, __path__)  # importing registers the method

from .config import RoadConfig  # noqa: E402
from .layer import RoadAdapter  # noqa: E402

__all__ = ["RoadConfig", "RoadAdapter"]
