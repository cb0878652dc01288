"""SupertuningConfig: field names and defaults as in Hugging Face PEFT (0.21), validated when built."""

from __future__ import annotations

import dataclasses
import warnings
from typing import ClassVar

from ...config import ConfigError, PeftConfig, check_bool, check_int, check_number, check_probability


@dataclasses.dataclass
class SupertuningConfig(PeftConfig):
    """Super-Tuning configuration: train ``k = int(numel(W) (1 - sparsity))`` entries of each adapted weight, the
    largest (``select_top``) or smallest by magnitude, plus a LoRA pair when ``r`` is set (the paper's "Supra").

    Args:
        target_modules: names (exact or dotted suffix), a full-match regex or ``"all-linear"``; None picks the
            architecture's query and value projections (PEFT's LoRA defaults).
        modules_to_save: modules trained in full and saved with the adapter.
        sparsity: fraction of each weight left frozen, in [0, 1) (0.99: 1% of the entries train).
        select_top: True trains the largest-magnitude entries, False the smallest.
        r: rank of the LoRA pair added to the sparse support (None: sparse entries only).
        lora_alpha: LoRA scale numerator (``alpha / r``); None with ``r`` set becomes ``2 r``; must be None when
            ``r`` is None.
        lora_dropout: dropout on the LoRA branch's input, in [0, 1).
        init_weights: True starts at the base (values and LoRA ``B`` zero); False draws the values standard
            normal and ``B`` Kaiming uniform.
        save_precomputed_indices: write the selected positions (int32) into the adapter file; False recomputes
            them from the base weights' magnitudes on load (the base must be the one trained on).
    """

    PEFT_TYPE: ClassVar[str] = "SUPERTUNING"

    target_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    sparsity: float = 0.99
    select_top: bool = True
    r: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    init_weights: bool = True
    save_precomputed_indices: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_probability(self, "sparsity")
        check_bool(self, "select_top", "init_weights", "save_precomputed_indices")
        if self.r is not None:
            check_int(self, "r", 1)
            if self.lora_alpha is None:
                self.lora_alpha = 2 * self.r
            check_number(self, "lora_alpha")
        elif self.lora_alpha is not None:
            raise ConfigError(
                "SupertuningConfig.lora_alpha: set but r is None; the LoRA branch (Supra) needs an explicit r"
            )
        check_probability(self, "lora_dropout")
        if not self.save_precomputed_indices:
            warnings.warn(
                "SupertuningConfig.save_precomputed_indices=False: the sparse support is recomputed from the base "
                "weights' magnitudes on load; the base must be identical to the one trained on", stacklevel=3,
            )
