"""MiSS (matrix shard sharing, formerly Bone): one small block shared by every shard of the weight."""

from .. import import_submodules

import_submodules(__name__, __path__)  # importing registers the method

from .config import MissConfig  # noqa: E402
from .layer import MissAdapter  # noqa: E402

__all__ = ["MissConfig", "MissAdapter"]
