"""TinyLoRA: an SVD frame of each pretrained weight, steered by a tiny trained vector through fixed random
projections (arXiv 2602.04118)."""

from .. import import_submodules

import_submodules(__name__, __path__)  # importing registers the method

from .config import TinyLoraConfig  # noqa: E402
from .layer import TinyLoraAdapter  # noqa: E402

__all__ = ["TinyLoraConfig", "TinyLoraAdapter"]
