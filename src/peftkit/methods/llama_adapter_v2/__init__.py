"""LLaMA-Adapter V2: bias / scale tuning, gated adaption prompts, early fusion of a visual prompt (arXiv 2304.15010)."""

from .. import import_submodules

import_submodules(__name__, __path__)  # importing registers the method

from .config import LlamaAdapterV2Config  # noqa: E402
from .layer import (  # noqa: E402
    BiasScaleAdapter,
    GatedPromptAdapter,
    LlamaAdapterV2Adapter,
    merge_bias_scale,
    unmerge_bias_scale,
)

__all__ = ["BiasScaleAdapter", "GatedPromptAdapter", "LlamaAdapterV2Adapter", "LlamaAdapterV2Config",
           "merge_bias_scale", "unmerge_bias_scale"]
