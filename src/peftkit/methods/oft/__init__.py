"""Orthogonal fine-tuning: OFT / COFT (block-diagonal Cayley rotations) and BOFT (butterfly factors)."""

from .. import import_submodules

import_submodules(__name__, __path__)  # importing registers every method in the package

from .config import BOFTConfig, OFTConfig  # noqa: E402
from .layer import BOFTAdapter, OFTAdapter  # noqa: E402

__all__ = ["BOFTConfig", "OFTConfig", "BOFTAdapter", "OFTAdapter"]
