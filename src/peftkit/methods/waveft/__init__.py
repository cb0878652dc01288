"""WaveFT: sparse trainable wavelet coefficients, the update their inverse 2-D wavelet transform (arXiv 2505.12532)."""

from .. import import_submodules

import_submodules(__name__, __path__)  # importing registers the method

from .config import WaveFTConfig  # noqa: E402
from .layer import WaveFTAdapter  # noqa: E402

__all__ = ["WaveFTConfig", "WaveFTAdapter"]
