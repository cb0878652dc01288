"""PEANuT: parameter-efficient adaptation with weight-aware neural tweakers (arXiv 2410.01870)."""

from .. import import_submodules

import_submodules(__name__, __path__)  # importing registers the method

from .config import PeanutConfig  # noqa: E402
from .layer import PeanutAdapter  # noqa: E402

__all__ = ["PeanutConfig", "PeanutAdapter"]
