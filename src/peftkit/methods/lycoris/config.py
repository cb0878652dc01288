"""LoHaConfig and LoKrConfig: field names and defaults as in Hugging Face PEFT, validated when built."""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import ClassVar

from ...config import (
    ConfigError, PeftConfig, check_bool, check_int, check_number, check_pattern, check_probability, is_int,
)


@dataclasses.dataclass
class _LycorisConfig(PeftConfig):
    """Fields shared by LoHa and LoKr (PEFT's ``LycorisConfig`` plus the common LyCORIS options).

    Args:
        rank_pattern / alpha_pattern: per-module overrides of r / alpha, keyed by regex.
        r: rank of the low-rank factors.
        alpha: scale numerator: ``s = alpha / r``.
        rank_dropout: in training, drop each output row of the weight delta with this probability.
        module_dropout: in training, skip the whole adapter with this probability.
        use_effective_conv2d: CP (Tucker) parametrisation of conv kernels larger than 1x1.
        target_modules: module names (exact or dotted suffix), a full-match regex, or ``"all-linear"``.
            None picks the architecture's default (query and value projections).
        exclude_modules: names or regex never to target.
        init_weights: True starts at the base model (one factor zero); False makes every factor random.
        layers_to_transform / layers_pattern: keep only these layer indices.
        modules_to_save: modules trained in full and saved with the adapter.
    """

    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False

    def _validate_common(self) -> None:
        name = type(self).__name__
        check_int(self, "r", 1)
        check_number(self, "alpha", above=0)
        check_probability(self, "rank_dropout")
        check_probability(self, "module_dropout")
        check_pattern(self, "rank_pattern", integer=True)
        check_pattern(self, "alpha_pattern", integer=False)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError(f"{name}.layers_pattern: only meaningful together with layers_to_transform")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ConfigError(
                f"{name}.layers_to_transform: cannot be used when target_modules is a regex string; "
                "put the layer filter into the regex"
            )


@dataclasses.dataclass
class LoHaConfig(_LycorisConfig):
    """LoHa (FedPara, Hyeon-Woo et al. 2022, arXiv 2108.06098): ``dW = (B1 A1) * (B2 A2) * alpha / r``."""

    PEFT_TYPE: ClassVar[str] = "LOHA"

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self._validate_common()
        check_bool(self, "init_weights")


@dataclasses.dataclass
class LoKrConfig(_LycorisConfig):
    """LoKr (KronA, Edalati et al. 2022, arXiv 2212.10650; LyCORIS): ``dW = W1 (x) W2 * alpha / r``.

    Args (beyond the shared ones):
        decompose_both: also factor ``W1 = W1_a W1_b`` (when r is small next to its dimensions).
        decompose_factor: target size of one Kronecker factor's dimensions (-1: near the square root).
        rank_dropout_scale: rescale the rank-dropout mask to mean 1.
        init_weights: True (W1 zero), "lycoris" (W2 zero) or False (all random).
    """

    PEFT_TYPE: ClassVar[str] = "LOKR"

    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    init_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self._validate_common()
        self._check(
            is_int(self.decompose_factor) and (self.decompose_factor == -1 or self.decompose_factor > 0),
            "decompose_factor", "-1 or an integer > 0",
        )
        self._check(
            isinstance(self.init_weights, bool) or self.init_weights == "lycoris",
            "init_weights", "True, False or 'lycoris'",
        )
