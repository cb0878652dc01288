"""The LoRA family: LoRA, rsLoRA, DoRA, PiSSA / OLoRA initialisation (options of one method)."""

from .config import LoraConfig
from .layer import LoraAdapter

__all__ = ["LoraConfig", "LoraAdapter"]
