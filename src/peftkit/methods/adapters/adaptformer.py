"""AdaptFormer (Chen et al. 2022, "AdaptFormer: Adapting Vision Transformers for Scalable Visual
Recognition", arXiv 2205.13535): a bottleneck module parallel to each block's MLP,

    x' = MLP(LN(x)) + s Up(ReLU(Down(LN(x)))) + x,

Down (m, d), Up (d, m), m = 64, s = 0.1, Up and both biases zero-initialised (so the model starts at the
base), Down Kaiming-uniform. Parameters per block 2dm + m + d. On ViT / CLIP the MLP is one module whose
input is already LN(x); on BERT-like models the split FFN is handled as for the parallel adapter
(``bottleneck.py``). The adapter math is the bottleneck adapter's ``parallel`` mode; only the defaults differ.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ...registry import register_method
from .bottleneck import VARIANT_META, BottleneckAdapter
from .bottleneck_config import BottleneckConfig


@dataclasses.dataclass
class AdaptFormerConfig(BottleneckConfig):
    """AdaptFormer: ``MLP(LN(x)) + s Up(ReLU(Down(LN(x))))``, m = 64, s = 0.1, Up zero-init.

    Args: as :class:`BottleneckConfig`.
    """

    PEFT_TYPE: ClassVar[str] = "ADAPTFORMER"

    positions: list[str] = dataclasses.field(default_factory=lambda: ["ffn"])
    mode: str = "parallel"
    bottleneck_size: int | None = 64
    scaling: float = 0.1
    init_weights: str = "lora"


@register_method("adaptformer", config=AdaptFormerConfig, modalities=("vision", "vision-language", "text"),
                 paper="arXiv 2205.13535 (Chen et al. 2022)", examples={"adaptformer": {"bottleneck_size": 4}},
                 **VARIANT_META)
class AdaptFormerAdapter(BottleneckAdapter):
    """AdaptFormer: ``MLP(LN(x)) + s Up(ReLU(Down(LN(x))))``, m = 64, s = 0.1, Up zero-init."""
