"""Lily: a low-rank projection per layer (shared by stride_A layers) and a routed pool of shared experts."""

from .. import import_submodules

import_submodules(__name__, __path__)  # importing registers every method in the package

from .config import LilyConfig  # noqa: E402
from .layer import LilyAdapter  # noqa: E402

__all__ = ["LilyConfig", "LilyAdapter"]
