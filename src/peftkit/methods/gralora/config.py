"""GraloraConfig: field names and defaults as in Hugging Face PEFT (0.21), validated when built."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ...config import ConfigError, PeftConfig, check_bool, check_int, check_number, check_probability


@dataclasses.dataclass
class GraloraConfig(PeftConfig):
    """GraLoRA configuration (arXiv 2505.20355).

    Args:
        r: total rank of the block adapter: every one of the ``gralora_k^2`` blocks gets rank ``r / gralora_k``;
            the parameter count is LoRA's at rank r.
        hybrid_r: rank of an additional plain LoRA over the whole layer (Hybrid GraLoRA); 0: none.
        target_modules: names (exact or dotted suffix), a full-match regex or ``"all-linear"``; None picks
            the architecture's LoRA defaults. Linear and GPT-2 Conv1D only.
        alpha: scale numerator: ``s = alpha / (r + hybrid_r)``.
        gralora_dropout: dropout on the adapter branch's input.
        gralora_k: blocks per side; must divide r and each target's in and out features.
        fan_in_fan_out: the base weight is stored (in, out), as GPT-2's Conv1D (set automatically).
        bias: which base biases train and are saved: "none", "all" or "gralora_only".
        modules_to_save: modules trained in full and saved with the adapter.
        init_weights: True: ``B`` factors zero (the model starts at the base); False: all factors random.
        layers_to_transform / layers_pattern: keep only these layer indices.
    """

    PEFT_TYPE: ClassVar[str] = "GRALORA"

    r: int = 32
    hybrid_r: int = 0
    target_modules: list[str] | str | None = None
    alpha: int = 64
    gralora_dropout: float = 0.0
    gralora_k: int = 2
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "r", 1)
        check_int(self, "hybrid_r", 0)
        check_int(self, "gralora_k", 1)
        check_number(self, "alpha")
        check_probability(self, "gralora_dropout")
        check_bool(self, "fan_in_fan_out", "init_weights")
        self._check(self.bias in ("none", "all", "gralora_only"), "bias", "'none', 'all' or 'gralora_only'")
        if self.r % self.gralora_k:
            divisors = [k for k in range(1, self.r + 1) if self.r % k == 0]
            raise ConfigError(
                f"GraloraConfig.gralora_k: expected a divisor of r={self.r} (one of {divisors}), got {self.gralora_k}"
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("GraloraConfig.layers_pattern: only meaningful together with layers_to_transform")
