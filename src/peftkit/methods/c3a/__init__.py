"""C3A: circular-convolution adaptation, a block-circulant weight update (arXiv 2407.19342)."""

from .. import import_submodules

import_submodules(__name__, __path__)  # importing registers the method

from .config import C3AConfig  # noqa: E402
from .layer import C3AAdapter  # noqa: E402

__all__ = ["C3AConfig", "C3AAdapter"]
