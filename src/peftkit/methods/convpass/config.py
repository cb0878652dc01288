"""ConvpassConfig (peft has no Convpass): the official implementation's hyper-parameters, validated when built."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ...config import ConfigError, PeftConfig, check_bool, check_int, check_number, check_probability

POSITIONS = ("attention", "ffn")


@dataclasses.dataclass
class ConvpassConfig(PeftConfig):
    """Convpass (Jie & Deng 2022, arXiv 2208.07463): ``X + Attn(LN X) + s Convpass(LN X)``, the same beside the MLP.

    Args:
        positions: the sublayers a bypass sits beside: "attention" (the block's self-attention module) and / or
            "ffn" (its MLP). Resolved on ViT; ignored when ``target_modules`` is set.
        target_modules: explicit module names / dotted suffixes / a full-match regex of sublayers whose input is
            a ViT token sequence (one [CLS] token, then a square grid of patch tokens) and whose output has the
            same width (any module with a Linear inside).
        exclude_modules, layers_to_transform, layers_pattern: as for every method.
        dim: c, the bypass width (the official code's ``dim``, 8).
        scale: s, the factor on the bypass output (the official ``set_Convpass`` default 1; the paper tunes it per
            data set).
        xavier_init: the 3x3 convolution starts Xavier-uniform; False (the official default) starts it at the
            identity on its centre tap (zero elsewhere).
        dropout: dropout before the up-projection (0.1 in the official code).
        modules_to_save: modules trained in full and saved with the adapter (the classifier head).
    """

    PEFT_TYPE: ClassVar[str] = "CONVPASS"

    positions: list[str] = dataclasses.field(default_factory=lambda: list(POSITIONS))
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    dim: int = 8
    scale: float = 1.0
    xavier_init: bool = False
    dropout: float = 0.1
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.positions, str):
            self.positions = [self.positions]
        self._check(isinstance(self.positions, list) and bool(self.positions)
                    and all(p in POSITIONS for p in self.positions), "positions",
                    f"a non-empty list of {POSITIONS}")
        check_int(self, "dim", 1)
        check_number(self, "scale")
        check_bool(self, "xavier_init")
        check_probability(self, "dropout")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("ConvpassConfig.layers_pattern: only meaningful together with layers_to_transform")
