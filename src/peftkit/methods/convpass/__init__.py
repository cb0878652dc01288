"""Convpass: a convolutional bypass beside each ViT block's attention and MLP (arXiv 2208.07463)."""

from .. import import_submodules

import_submodules(__name__, __path__)  # importing registers the method

from .config import ConvpassConfig  # noqa: E402
from .layer import ConvpassAdapter  # noqa: E402

__all__ = ["ConvpassConfig", "ConvpassAdapter"]
