"""DeftConfig: field names and defaults as in Hugging Face PEFT, validated when built."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ...config import ConfigError, PeftConfig, check_bool, check_int, check_number, check_probability


@dataclasses.dataclass
class DeftConfig(PeftConfig):
    """DeFT (decompositional efficient fine-tuning, NeurIPS 2025); ``para=True`` is PaRa (subspace removal only).

    Args:
        r: rank of the projection direction ``P`` (d_out, r) and the injection ``R`` (r, d_in); capped at d_out.
        target_modules: names (exact or dotted suffix), a full-match regex or ``"all-linear"``; None picks
            the architecture's query and value projections.
        exclude_modules: names or regex never to target.
        decomposition_method: "relu" (``P_proj = P relu(P)^T``) or "qr" (``Q Q^T``, ``Q`` from the QR of ``P``).
        init_scale: factor on the std (0.02) of ``R``'s random init (``init_weights=False`` only).
        alpha: the injection is scaled by ``alpha / r``; None (or 0): no scaling.
        para: True: PaRa, ``dW = -P_proj W`` (no ``R``).
        fan_in_fan_out: kept for PEFT's files; the layout is read from the layer (GPT-2's Conv1D is transposed).
        deft_dropout: dropout on the injection's input.
        init_weights: True: ``R = right(P)^T W / scale`` (the model starts at the base); False: ``R`` random.
        layers_to_transform / layers_pattern: keep only these layer indices.
        bias: which base biases train and are saved with the adapter: "none", "all" or "deft_only".
        modules_to_save: modules trained in full and saved with the adapter.
    """

    PEFT_TYPE: ClassVar[str] = "DEFT"

    r: int = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    decomposition_method: str = "relu"
    init_scale: float = 1.0
    alpha: int | None = None
    para: bool = False
    fan_in_fan_out: bool = False
    deft_dropout: float = 0.0
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "r", 1)
        check_number(self, "init_scale")
        if self.alpha is not None:
            check_number(self, "alpha", expected="a number or None")
        check_bool(self, "para", "fan_in_fan_out", "init_weights")
        check_probability(self, "deft_dropout")
        self._check(self.decomposition_method in ("relu", "qr"), "decomposition_method", "'relu' or 'qr'")
        self._check(self.bias in ("none", "all", "deft_only"), "bias", "'none', 'all' or 'deft_only'")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ConfigError("DeftConfig.layers_to_transform: cannot be used when target_modules is a regex string")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ConfigError("DeftConfig.layers_pattern: cannot be used when target_modules is a regex string")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("DeftConfig.layers_pattern: only meaningful together with layers_to_transform")
