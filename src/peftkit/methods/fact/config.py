"""FacTConfig (peft has no FacT): the official implementation's hyper-parameters, validated when built."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ...config import ConfigError, PeftConfig, check_int, check_number, check_probability


@dataclasses.dataclass
class FacTConfig(PeftConfig):
    """FacT (Jie & Deng 2023, arXiv 2212.03145): ``dW = s U Sigma V^T`` per d x d slice of the stacked weights.

    Args:
        fact_type: "tt" (FacT-TT, tensor-train: one r x r core per slice) or "tk" (FacT-TK, Tucker: one shared
            r x r x r core C, one r-vector of the factor P per slice).
        r: the rank of the factors (the paper: 8 for FacT-TT, 32 for FacT-TK on ViT-B).
        scale: s, the factor on the update (official default 1; the paper tunes it per data set).
        dropout: dropout on the rank-r activation inside the update (0.1 in the official code); the merged weight
            has none.
        target_modules: names (exact or dotted suffix), a full-match regex or ``"all-linear"``; None picks every
            block's query, key, value, attention output and both FFN Linears (the paper's q, k, v, o, fc1, fc2).
        hidden_size: d, the side of the tensor's d x d slices. None: filled in at injection with the most common
            input width among the targets (the model width, as the paper's d = 768 on ViT-B); a weight whose
            widths are not multiples of d is covered by ``ceil(width / d)`` slices, the last one cropped.
        exclude_modules, layers_to_transform, layers_pattern: as for every method.
        fan_in_fan_out: the base weight is stored (in, out), as GPT-2's Conv1D (set automatically).
        modules_to_save: modules trained in full and saved with the adapter (the classifier head).
    """

    PEFT_TYPE: ClassVar[str] = "FACT"

    fact_type: str = "tt"
    r: int = 8
    scale: float = 1.0
    dropout: float = 0.1
    target_modules: list[str] | str | None = None
    hidden_size: int | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check(self.fact_type in ("tt", "tk"), "fact_type", '"tt" or "tk"')
        check_int(self, "r", 1)
        check_number(self, "scale")
        check_probability(self, "dropout")
        check_int(self, "hidden_size", 1, optional=True, expected="a positive int or None")
        self._check(isinstance(self.fan_in_fan_out, bool), "fan_in_fan_out", "True or False")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("FacTConfig.layers_pattern: only meaningful together with layers_to_transform")
