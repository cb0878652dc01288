"""AdaLoRA (Zhang et al. 2023, arXiv 2303.10512): SVD-form LoRA with importance-driven rank allocation."""

from .allocator import RankAllocator, budget_schedule, orthogonality_penalty
from .config import AdaLoraConfig
from .layer import AdaLoraAdapter

__all__ = ["AdaLoraAdapter", "AdaLoraConfig", "RankAllocator", "budget_schedule", "orthogonality_penalty"]
