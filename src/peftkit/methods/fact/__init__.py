"""FacT: factor-tuning, every adapted weight's update as one slice of a low-rank tensor (arXiv 2212.03145)."""

from .. import import_submodules

import_submodules(__name__, __path__)  # importing registers the method

from .config import FacTConfig  # noqa: E402
from .layer import FacTAdapter  # noqa: E402

__all__ = ["FacTConfig", "FacTAdapter"]
