"""GraLoRA: a k x k grid of small LoRAs on each adapted weight."""

from .. import import_submodules

import_submodules(__name__, __path__)  # importing registers every method in the package

from .config import GraloraConfig  # noqa: E402
from .layer import GraloraAdapter  # noqa: E402

__all__ = ["GraloraConfig", "GraloraAdapter"]
