"""RoadConfig: field names and defaults as in Hugging Face PEFT, validated when built."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ...config import PeftConfig, check_bool, check_int

VARIANTS = ("road_1", "road_2", "road_4")


@dataclasses.dataclass
class RoadConfig(PeftConfig):
    """RoAd (Liao et al. 2024, arXiv 2409.00119).

    Args:
        variant: how many angles / scales each 2x2 rotation has: ``"road_1"`` one angle and one scale per
            pair (d_out / 2 of each per layer), ``"road_2"`` one per element (d_out), ``"road_4"`` two per
            element, separate for the two columns of each 2x2 block (2 d_out).
        group_size: the output is split into groups of this many elements; element ``j`` of a group is paired
            with element ``j + group_size / 2``. An even integer that divides every targeted layer's output
            width (peft's default 64 suits real models; tiny ones need a smaller value).
        init_weights: True: angles 0 and scales 1 (the identity: the model starts at the base); False: angles
            N(0, 0.5^2), scales N(1, 0.5^2) (tests).
        target_modules: names (exact or dotted suffix), a full-match regex or ``"all-linear"``; None picks
            the architecture's query and value projections (peft's LoRA defaults).
        modules_to_save: modules trained in full and saved with the adapter.
    """

    PEFT_TYPE: ClassVar[str] = "ROAD"

    variant: str = "road_1"
    group_size: int = 64
    init_weights: bool = True
    target_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check(self.variant in VARIANTS, "variant", "one of 'road_1', 'road_2', 'road_4'")
        check_int(self, "group_size", 2, expected="an even integer >= 2")
        self._check(self.group_size % 2 == 0, "group_size", "an even integer >= 2")
        check_bool(self, "init_weights")
