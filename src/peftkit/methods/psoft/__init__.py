"""PSOFT: orthogonal fine-tuning in the principal subspace (arXiv 2505.11235)."""

from .. import import_submodules

import_submodules(__name__, __path__)  # importing registers the method

from .config import PsoftConfig  # noqa: E402
from .layer import PsoftAdapter  # noqa: E402

__all__ = ["PsoftConfig", "PsoftAdapter"]
