"""AdaLoraConfig: Hugging Face PEFT's fields and defaults, validated when built.

AdaLoRA (Zhang et al. 2023, arXiv 2303.10512) trains in three phases set by ``tinit``, ``tfinal`` and
``total_step``: ``tinit`` warm-up steps at the full rank ``init_r``; a budget phase up to step
``total_step - tfinal`` in which the total rank shrinks along the cubic schedule of the paper's eq. (12)
towards ``target_r`` per matrix; then ``tfinal`` steps of fine-tuning at the final ranks.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import field
from typing import ClassVar

from ...config import ConfigError, check_int, check_number, check_probability
from ..lora.config import LoraConfig


@dataclasses.dataclass
class AdaLoraConfig(LoraConfig):
    """AdaLoRA: LoRA in SVD form ``P diag(lambda) Q`` whose rank budget is re-allocated during training.

    Inherits LoRA's fields (``target_modules``, ``lora_alpha``, ``lora_dropout``, ``bias``,
    ``modules_to_save``, ...); ``r`` is not used (``init_r`` is the starting rank), as in PEFT.

    Args:
        target_r: average rank per adapted matrix at the end of the budget phase (the total budget is
            ``target_r`` times the number of matrices), an integer in [1, init_r].
        init_r: rank every matrix starts with.
        tinit: warm-up steps before any rank is pruned.
        tfinal: final steps at the allocated ranks (no further pruning).
        deltaT: the rank budget is re-allocated every ``deltaT`` steps of the budget phase.
        beta1: EMA coefficient of the sensitivity ``I`` (eq. 8), in [0, 1).
        beta2: EMA coefficient of the uncertainty ``U`` (eq. 9), in [0, 1).
        orth_reg_weight: weight of the orthogonality penalty on ``P`` and ``Q`` added to the loss (eq. 4), >= 0.
        total_step: number of training steps; required (> tinit + tfinal).
        rank_pattern: which singular triplets each matrix keeps, ``{"<module path>.lora_E": [bool] * init_r}``.
            Written by the rank allocator during training and saved with the adapter; a saved adapter keeps
            only the ranks marked True (loading rebuilds each matrix at that rank).
    """

    PEFT_TYPE: ClassVar[str] = "ADALORA"

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[str, list[bool]] | None = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        # LoRA's rank_pattern holds ranks (ints); AdaLoRA's holds masks, checked below
        pattern, self.rank_pattern = self.rank_pattern, {}
        try:
            super().__post_init__()
        finally:
            self.rank_pattern = pattern
        check = self._check
        check_int(self, "init_r", 1)
        check_int(self, "target_r", 1)
        if self.target_r > self.init_r:
            raise ConfigError(
                f"AdaLoraConfig.target_r: expected at most init_r={self.init_r} (ranks only shrink), "
                f"got {self.target_r}"
            )
        check_int(self, "tinit", 0)
        check_int(self, "tfinal", 0)
        check_int(self, "deltaT", 1)
        check_probability(self, "beta1")
        check_probability(self, "beta2")
        check_number(self, "orth_reg_weight", minimum=0)
        check_int(self, "total_step", 1,
                  expected="an integer > 0 (AdaLoRA's schedule needs the number of training steps)")
        if self.tinit + self.tfinal >= self.total_step:
            raise ConfigError(
                f"AdaLoraConfig.tinit + tfinal: expected less than total_step={self.total_step} so that a "
                f"budget phase remains, got tinit={self.tinit} + tfinal={self.tfinal}"
            )
        check(not self.use_dora, "use_dora", "False (AdaLoRA does not support DoRA)")
        check(not self.use_rslora, "use_rslora", "False (AdaLoRA scales by lora_alpha / init_r)")
        check(not self.alpha_pattern, "alpha_pattern", "{} (AdaLoRA uses one lora_alpha)")
        check(
            isinstance(self.init_lora_weights, bool), "init_lora_weights",
            "True (E = 0, P and Q ~ N(0, 0.02)) or False (all N(0, 1))",
        )
        self._check_rank_pattern()
        if self.r != 8:  # LoraConfig's default
            warnings.warn("AdaLoraConfig.r is not used; set the starting rank with init_r", stacklevel=3)

    def _check_rank_pattern(self) -> None:
        if self.rank_pattern is None:
            return
        if not isinstance(self.rank_pattern, dict):
            raise ConfigError(f"AdaLoraConfig.rank_pattern: expected a dict or None, got {self.rank_pattern!r}")
        for key, mask in self.rank_pattern.items():
            if not (isinstance(mask, list) and all(isinstance(v, bool) for v in mask)):
                raise ConfigError(f"AdaLoraConfig.rank_pattern[{key!r}]: expected a list of booleans, got {mask!r}")
