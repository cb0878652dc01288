"""Uni-LoRA: every layer's LoRA factors read from one trained vector theta_d through a fixed projection."""

from .. import import_submodules

import_submodules(__name__, __path__)  # importing registers the method

from .config import UniLoraConfig  # noqa: E402
from .layer import UniLoraAdapter  # noqa: E402

__all__ = ["UniLoraConfig", "UniLoraAdapter"]
