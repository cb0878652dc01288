"""AdaLoRA (Zhang et al. 2023, arXiv 2303.10512): SVD-form LoRA with importance-driven rank allocation."""

from .. import import_submodules

import_submodules(__name__, __path__)  # importing registers every method in the package

from .allocator import RankAllocator, budget_schedule, orthogonality_penalty  # noqa: E402
from .config import AdaLoraConfig  # noqa: E402
from .layer import AdaLoraAdapter  # noqa: E402

__all__ = ["AdaLoraAdapter", "AdaLoraConfig", "RankAllocator", "budget_schedule", "orthogonality_penalty"]
