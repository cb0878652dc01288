"""OSF: orthogonal subspace fine-tuning for continual learning (arXiv 2504.07097)."""

from .. import import_submodules

import_submodules(__name__, __path__)  # importing registers the method

from .config import OSFConfig  # noqa: E402
from .layer import OSFAdapter  # noqa: E402

__all__ = ["OSFConfig", "OSFAdapter"]
