"""P-tuning v2 (Liu et al. 2022, "P-Tuning v2: Prompt Tuning Can Be Comparable to Fine-tuning Universally Across
Scales and Tasks", arXiv 2110.07602): deep prompts, i.e. a learned key/value prefix in every layer, learned
directly (no reparameterisation MLP), with a linear classification head trained in full.

A preset over prefix tuning, not a new mechanism: the adapter is prefix tuning's, ``prefix_projection`` is
off, and the model's classification head (``classifier`` / ``score``) joins ``modules_to_save`` when present.
Its checkpoint is a PEFT ``PREFIX_TUNING`` adapter (``prompt_embeddings`` (n, 2 L d) plus the head), which
Hugging Face PEFT loads as prefix tuning; peftkit loads it back as prefix tuning too.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from ...registry import register_method
from .prefix_tuning import PrefixAdapter, PrefixTuningConfig

HEADS = ("classifier", "score")


@dataclasses.dataclass
class PTuningV2Config(PrefixTuningConfig):
    """P-tuning v2: prefix tuning with ``prefix_projection=False`` and the classification head trainable.

    Args: as :class:`PrefixTuningConfig` (``prefix_projection`` must stay False).
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check(self.prefix_projection is False, "prefix_projection", "False (P-tuning v2 learns the prefix "
                    "directly; use prefix_tuning for the MLP)")


@register_method(
    "p_tuning_v2",
    config=PTuningV2Config,
    category="prompt",
    modalities=("text",),
    mergeable=False,
    starts_at_base=False,
    param_formula="n * 2 L d (+ the classification head)",
    position="key/value prefixes in every attention layer; the classification head",
    paper="arXiv 2110.07602 (Liu et al. 2022, P-tuning v2)",
    examples={"p_tuning_v2": {"num_virtual_tokens": 4}},
)
class PTuningV2Adapter(PrefixAdapter):
    method = "p_tuning_v2"

    @classmethod
    def prepare_config(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: Any) -> None:
        super().prepare_config(model, named, config)
        heads = [h for h in HEADS if isinstance(getattr(model, h, None), nn.Module)]
        config.modules_to_save = list(dict.fromkeys([*(config.modules_to_save or []), *heads])) or None
