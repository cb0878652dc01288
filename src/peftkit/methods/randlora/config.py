"""RandLoraConfig: field names and defaults as in Hugging Face PEFT (0.21), validated when built."""

from __future__ import annotations

import dataclasses
import warnings
from typing import ClassVar

from ...config import ConfigError, PeftConfig, check_bool, check_int, check_number, check_probability


@dataclasses.dataclass
class RandLoraConfig(PeftConfig):
    """RandLoRA configuration (arXiv 2502.00987).

    Args:
        r: rank of each random basis. Unlike LoRA, the trainable count falls as r grows: a layer with
            ``m = min(d_in, d_out)`` gets ``N = ceil(m / r)`` bases and ``r N + N m`` trainable numbers.
        target_modules: names (exact or dotted suffix), a full-match regex or ``"all-linear"``; None picks
            the architecture's LoRA defaults (query and value projections). Linear and GPT-2 Conv1D only.
        projection_prng_key: seed of the shared random bases ``randlora_A`` / ``randlora_B``.
        save_projection: write the bases into the adapter file (else they are regenerated from the seed).
        sparse: ternary bases (-1, 0, 1 with probabilities 1/6, 2/3, 1/6), scaled to unit std.
        very_sparse: ternary bases with P(+-1) = 1 / (2 sqrt(m)) each (m: the largest target's smaller side).
        randlora_dropout: dropout on the adapter branch's input.
        fan_in_fan_out: the base weight is stored (in, out), as GPT-2's Conv1D (set automatically).
        randlora_alpha: scale numerator: ``s = randlora_alpha / r`` (peft's default 640 = 20 x 32).
        bias: which base biases train and are saved: "none", "all" or "randlora_only".
        modules_to_save: modules trained in full and saved with the adapter.
        init_weights: True: ``lambda = 0`` and ``gamma = 1 / max(N, m)`` (the model starts at the base);
            False (tests): ``lambda`` standard normal, ``gamma = 1 / max(d_in, d_out)``.
        layers_to_transform / layers_pattern: keep only these layer indices.
    """

    PEFT_TYPE: ClassVar[str] = "RANDLORA"

    r: int = 32
    target_modules: list[str] | str | None = None
    projection_prng_key: int = 0
    save_projection: bool = True
    sparse: bool = False
    very_sparse: bool = False
    randlora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    randlora_alpha: int = 640
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "r", 1)
        check_int(self, "projection_prng_key")
        check_bool(self, "save_projection", "sparse", "very_sparse", "fan_in_fan_out", "init_weights")
        check_probability(self, "randlora_dropout")
        check_number(self, "randlora_alpha")
        self._check(self.bias in ("none", "all", "randlora_only"), "bias", "'none', 'all' or 'randlora_only'")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("RandLoraConfig.layers_pattern: only meaningful together with layers_to_transform")
        if not self.save_projection:
            warnings.warn(
                "RandLoraConfig.save_projection=False: randlora_A / randlora_B are not saved and will be regenerated "
                "from projection_prng_key on load", stacklevel=3,
            )
