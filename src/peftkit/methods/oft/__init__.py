"""Orthogonal fine-tuning: OFT / COFT (block-diagonal Cayley rotations) and BOFT (butterfly factors)."""

from .config import BOFTConfig, OFTConfig
from .layer import BOFTAdapter, OFTAdapter

__all__ = ["BOFTConfig", "OFTConfig", "BOFTAdapter", "OFTAdapter"]
