"""PVeRA: probabilistic VeRA (arXiv 2512.07703)."""

from .. import import_submodules

import_submodules(__name__, __path__)  # importing registers the method

from .config import PveraConfig  # noqa: E402
from .layer import PveraAdapter  # noqa: E402

__all__ = ["PveraConfig", "PveraAdapter"]
