"""The LyCORIS family: LoHa (Hadamard product of low-rank factors) and LoKr (Kronecker product)."""

from .config import LoHaConfig, LoKrConfig
from .layer import LoHaAdapter, LoKrAdapter

__all__ = ["LoHaConfig", "LoKrConfig", "LoHaAdapter", "LoKrAdapter"]
