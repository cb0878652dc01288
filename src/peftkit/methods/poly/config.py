"""PolyConfig: field names and defaults as in Hugging Face PEFT, validated when built."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ...config import PeftConfig, check_bool, check_int


@dataclasses.dataclass
class PolyConfig(PeftConfig):
    """Polytropon (Ponti et al. 2022, arXiv 2202.13914) and Multi-Head Routing (Caccia et al. 2022,
    arXiv 2211.03831).

    Args:
        r: rank of each LoRA skill.
        target_modules: names (exact or dotted suffix), a full-match regex or ``"all-linear"``; None picks the
            architecture's query and value projections (PEFT's LoRA defaults).
        exclude_modules: names or regex never to target.
        modules_to_save: modules trained in full and saved with the adapter.
        init_weights: True: every skill's ``B`` is zero (the model starts at the base); False: random.
        poly_type: the router; only ``"poly"`` (a learned module-combination per task).
        n_tasks: number of tasks; each batch row names its task with ``task_ids`` (may be left out when 1).
        n_skills: number of LoRA skills in each adapted layer.
        n_splits: heads of Multi-Head Routing (> 1: each slice of the input / output features is routed on
            its own); must divide each adapted layer's input and output features.
    """

    PEFT_TYPE: ClassVar[str] = "POLY"

    r: int = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    poly_type: str = "poly"
    n_tasks: int = 1
    n_skills: int = 4
    n_splits: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "r", 1)
        check_int(self, "n_tasks", 1)
        check_int(self, "n_skills", 1)
        check_int(self, "n_splits", 1)
        check_bool(self, "init_weights")
        self._check(self.poly_type == "poly", "poly_type", "'poly' (the only router peft has)")
