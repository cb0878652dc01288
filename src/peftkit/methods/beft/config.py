"""BeftConfig: field names and defaults as in Hugging Face PEFT, validated when built."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ...config import PeftConfig, check_bool


@dataclasses.dataclass
class BeftConfig(PeftConfig):
    """BEFT (arXiv 2509.15974): a trained bias added to the output of each value projection.

    Args:
        target_modules: names (exact or dotted suffix), a full-match regex or ``"all-linear"``; None picks the
            architecture's value projection (PEFT's BEFT table: ``value`` on BERT / RoBERTa, ``v_proj`` on Llama,
            ``v`` on T5 ...). Architectures that fuse query, key and value into one projection (GPT-2's
            ``c_attn``) have no default: name the targets.
        modules_to_save: modules trained in full and saved with the adapter.
        init_weights: True starts the biases at zero (the model starts at the base); False draws them from a
            standard normal (discouraged, as in PEFT).
    """

    PEFT_TYPE: ClassVar[str] = "BEFT"

    target_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bool(self, "init_weights")
