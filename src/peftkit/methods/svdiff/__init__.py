"""SVDiff: shifts of each weight's singular values, U, sigma, V frozen (arXiv 2303.11305)."""

from .. import import_submodules

import_submodules(__name__, __path__)  # importing registers the method

from .config import SVDiffConfig  # noqa: E402
from .layer import SVDiffAdapter  # noqa: E402

__all__ = ["SVDiffConfig", "SVDiffAdapter"]
