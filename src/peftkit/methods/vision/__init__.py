"""Vision and vision-language methods: VPT (ViT), CoOp / CoCoOp, CLIP-Adapter and Tip-Adapter (CLIP).

Importing the package registers every method in it. The CLIP methods share ``classify`` (zero-shot-style
classification through whatever adapters are active) and Tip-Adapter's ``build_cache``, from ``clip``.
"""

from .. import import_submodules

import_submodules(__name__, __path__)  # importing registers every method in the package

from . import clip_adapter, coop, tip_adapter, vpt  # noqa: E402
from .clip import build_cache, classify, set_tokenizer  # noqa: E402

__all__ = ["build_cache", "classify", "set_tokenizer", "clip_adapter", "coop", "tip_adapter", "vpt"]
