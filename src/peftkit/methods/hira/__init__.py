"""HiRA: high-rank adaptation by a Hadamard product of the frozen weight with a low-rank matrix."""

from .. import import_submodules

import_submodules(__name__, __path__)  # importing registers the method

from .config import HiraConfig  # noqa: E402
from .layer import HiraAdapter  # noqa: E402

__all__ = ["HiraConfig", "HiraAdapter"]
