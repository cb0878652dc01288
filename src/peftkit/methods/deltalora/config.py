"""DeltaLoraConfig: LoRA's field names and defaults (peft's ``LoraConfig``) for the ones Delta-LoRA uses, plus the
paper's update ratio and start step; validated when built. The type name ``DELTALORA`` is peftkit's (peft 0.21
has no Delta-LoRA)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ...config import PeftConfig, check_int, check_number
from ..lorafa.config import check_lora_fields


@dataclasses.dataclass
class DeltaLoraConfig(PeftConfig):
    """Delta-LoRA (Zi et al. 2023, arXiv 2309.02411): LoRA whose frozen weight also moves, after each optimizer
    step ``t > update_start_step``, by ``update_ratio * s * (B_{t+1} A_{t+1} - B_t A_t)``.

    Args:
        r: rank of the update ``B A``.
        target_modules: module names (exact or dotted suffix), a full-match regex, or ``"all-linear"``; None picks
            the architecture's query and value projections (LoRA's defaults).
        exclude_modules: names or regex never to target.
        lora_alpha: scale numerator: ``s = lora_alpha / r``.
        fan_in_fan_out: the base weight is stored (in, out), as GPT-2's Conv1D (set automatically).
        bias: which base biases train and are saved with the adapter: "none", "all" or "lora_only".
        modules_to_save: modules trained in full and saved with the adapter (e.g. a classifier head).
        init_lora_weights: True (A Kaiming-uniform, B zero: the model starts at the base), ``"gaussian"`` (A normal
            with std 1 / r, B zero) or False (B random too: not the identity; for tests).
        layers_to_transform / layers_pattern: keep only these layer indices.
        update_ratio: the paper's lambda, the weight of the product's delta in W's update (>= 0; 0 is LoRA).
        update_start_step: the paper's K: W is updated after the optimizer steps t > K (t counted from 0, the
            paper's Algorithm 1), so the first K + 1 steps train A and B only.

    There is no dropout field: the paper removes the low-rank branch's dropout so that the gradient of ``B A`` is
    the gradient W would have had.
    """

    PEFT_TYPE: ClassVar[str] = "DELTALORA"

    r: int = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    lora_alpha: float = 8
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    update_ratio: float = 0.5
    update_start_step: int = 500

    def __post_init__(self) -> None:
        super().__post_init__()
        check_lora_fields(self)
        check_number(self, "update_ratio", minimum=0)
        check_int(self, "update_start_step", 0)
