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
from typing import Any, ClassVar

from ...config import ConfigError
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
        check(_int(self.init_r) and self.init_r > 0, "init_r", "an integer > 0")
        check(_int(self.target_r) and self.target_r > 0, "target_r", "an integer > 0")
        if self.target_r > self.init_r:
            raise ConfigError(
                f"AdaLoraConfig.target_r: expected at most init_r={self.init_r} (ranks only shrink), "
                f"got {self.target_r}"
            )
        check(_int(self.tinit) and self.tinit >= 0, "tinit", "an integer >= 0")
        check(_int(self.tfinal) and self.tfinal >= 0, "tfinal", "an integer >= 0")
        check(_int(self.deltaT) and self.deltaT > 0, "deltaT", "an integer > 0")
        check(_number(self.beta1) and 0 <= self.beta1 < 1, "beta1", "a number in [0, 1)")
        check(_number(self.beta2) and 0 <= self.beta2 < 1, "beta2", "a number in [0, 1)")
        check(_number(self.orth_reg_weight) and self.orth_reg_weight >= 0, "orth_reg_weight", "a number >= 0")
        check(
            _int(self.total_step) and self.total_step > 0, "total_step",
            "an integer > 0 (AdaLoRA's schedule needs the number of training steps)",
        )
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


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
