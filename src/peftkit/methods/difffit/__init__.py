"""DiffFit: biases, normalization layers and a scale factor per residual branch (arXiv 2304.06648)."""

from .. import import_submodules

import_submodules(__name__, __path__)  # importing registers the method

from .config import DiffFitConfig  # noqa: E402
from .layer import DiffFitAdapter, residual_branch_outputs  # noqa: E402

__all__ = ["DiffFitConfig", "DiffFitAdapter", "residual_branch_outputs"]
