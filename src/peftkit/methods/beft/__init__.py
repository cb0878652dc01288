"""BEFT: bias-efficient fine-tuning, only the value projections' biases train (arXiv 2509.15974)."""

from .. import import_submodules

import_submodules(__name__, __path__)  # importing registers the method

from .config import BeftConfig  # noqa: E402
from .layer import BeftAdapter  # noqa: E402

__all__ = ["BeftConfig", "BeftAdapter"]
