"""Additive methods (bottleneck adapters, AdaptFormer, Compacter), composition blocks and hybrids.

Importing the package registers every method in it.
"""

from .. import import_submodules

import_submodules(__name__, __path__)  # importing registers every method in the package

from .adaptformer import AdaptFormerConfig  # noqa: E402
from .bottleneck import BottleneckConfig, HoulsbyConfig, ParallelAdapterConfig, PfeifferConfig  # noqa: E402
from .compacter import CompacterConfig, CompacterPlusPlusConfig  # noqa: E402
from .composition import Average, CompositionConfig, Fuse, Parallel, Stack  # noqa: E402
from .hybrid import HybridConfig, MamConfig, UniPeltConfig  # noqa: E402

__all__ = [
    "AdaptFormerConfig", "Average", "BottleneckConfig", "CompacterConfig", "CompacterPlusPlusConfig",
    "CompositionConfig", "Fuse", "HoulsbyConfig", "HybridConfig", "MamConfig", "Parallel", "ParallelAdapterConfig",
    "PfeifferConfig", "Stack", "UniPeltConfig",
]
