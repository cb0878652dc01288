"""SHiRA: sparse high-rank adapters (a trainable subset of each targeted weight)."""

from .. import import_submodules

import_submodules(__name__, __path__)  # importing registers the method

from .config import ShiraConfig  # noqa: E402
from .functional import random_mask  # noqa: E402
from .layer import ShiraAdapter  # noqa: E402

__all__ = ["ShiraConfig", "ShiraAdapter", "random_mask"]
