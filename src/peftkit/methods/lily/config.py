"""LilyConfig: field names and defaults as in Hugging Face PEFT (0.21), validated when built."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ...config import ConfigError, PeftConfig, check_bool, check_int, check_number


@dataclasses.dataclass
class LilyConfig(PeftConfig):
    """Lily configuration (arXiv 2407.09946).

    Args:
        r: rank: width of the shared projection ``A`` and of every expert ``B``.
        stride_A: consecutive layers of one group (same target suffix and weight shape) that share one ``A``.
        num_B: experts ``B`` shared by every layer of a group, mixed by each layer's router (at least 2).
        scaling: multiplier of the adapter's output (no alpha / r).
        target_modules: names (exact or dotted suffix), a full-match regex or ``"all-linear"``; None picks
            the architecture's LoRA defaults. nn.Linear (and, beyond PEFT, GPT-2's Conv1D).
        exclude_modules: names or regex never to target.
        modules_to_save: modules trained in full and saved with the adapter.
        layers_to_transform / layers_pattern: keep only these layer indices.
        init_weights: True: experts zero (the model starts at the base); False: all random.
    """

    PEFT_TYPE: ClassVar[str] = "LILY"

    r: int = 32
    stride_A: int = 1
    num_B: int = 2
    scaling: float = 1.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "r", 1)
        check_int(self, "stride_A", 1)
        check_int(self, "num_B", 2, expected="an integer >= 2 (the router mixes at least two experts)")
        check_number(self, "scaling")
        check_bool(self, "init_weights")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("LilyConfig.layers_pattern: only meaningful together with layers_to_transform")
