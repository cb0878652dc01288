"""HRAConfig: field names and defaults as in Hugging Face PEFT, validated when built."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ...config import ConfigError, PeftConfig, check_bool, check_int


@dataclasses.dataclass
class HRAConfig(PeftConfig):
    """HRA (Householder reflection adaptation, Yuan et al. 2024, arXiv 2405.17484).

    Args:
        r: number of Householder reflections per layer (best even: the default init pairs equal vectors so
            that the adapter starts at the identity; an odd r starts from random reflections, with a warning).
        apply_GS: orthonormalise the reflection vectors (Gram-Schmidt) before building the product.
        target_modules: names (exact or dotted suffix), a full-match regex or ``"all-linear"``; None picks
            the architecture's query and value projections.
        exclude_modules: names or regex never to target.
        init_weights: True: the symmetric (identity) init; False: every vector random (Kaiming uniform).
        layers_to_transform / layers_pattern: keep only these layer indices.
        bias: which base biases train and are saved with the adapter: "none", "all" or "hra_only".
        modules_to_save: modules trained in full and saved with the adapter.
    """

    PEFT_TYPE: ClassVar[str] = "HRA"

    r: int = 8
    apply_GS: bool = False
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "r", 1)
        check_bool(self, "apply_GS", "init_weights")
        self._check(self.bias in ("none", "all", "hra_only"), "bias", "'none', 'all' or 'hra_only'")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ConfigError("HRAConfig.layers_to_transform: cannot be used when target_modules is a regex string")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ConfigError("HRAConfig.layers_pattern: cannot be used when target_modules is a regex string")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("HRAConfig.layers_pattern: only meaningful together with layers_to_transform")
