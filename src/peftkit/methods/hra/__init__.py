"""HRA: Householder reflection adaptation (arXiv 2405.17484)."""

from .. import import_submodules

import_submodules(__name__, __path__)  # importing registers the method

from .config import HRAConfig  # noqa: E402
from .layer import HRAAdapter  # noqa: E402

__all__ = ["HRAConfig", "HRAAdapter"]
