"""GLoRA (Chavan et al. 2023, arXiv 2306.07967): generalized LoRA, a weight and bias re-parametrization."""

from .. import import_submodules

import_submodules(__name__, __path__)  # importing registers the method

from .config import GloraConfig  # noqa: E402
from .layer import GloraAdapter  # noqa: E402

__all__ = ["GloraConfig", "GloraAdapter"]
