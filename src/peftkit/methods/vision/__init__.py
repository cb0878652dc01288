"""Vision and vision-language methods: VPT (ViT), CoOp / CoCoOp, CLIP-Adapter and Tip-Adapter (CLIP).

Importing the package registers every method in it. The CLIP methods share ``classify`` (zero-shot-style
classification through whatever adapters are active) and Tip-Adapter's ``build_cache``, from ``clip``.
"""

from . import clip_adapter, coop, tip_adapter, vpt  # importing registers the methods
from .clip import build_cache, classify, set_tokenizer

__all__ = ["build_cache", "classify", "set_tokenizer", "clip_adapter", "coop", "tip_adapter", "vpt"]
