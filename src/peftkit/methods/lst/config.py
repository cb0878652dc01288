"""LSTConfig: ladder side-tuning's sizes and gates, validated when built (peft has no LST)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ...config import PeftConfig, check_bool, check_int, check_number


@dataclasses.dataclass
class LSTConfig(PeftConfig):
    """Ladder side-tuning (LST): a narrow side network beside a frozen encoder, fed by ladders from every block.

    Args:
        target_modules: the block stack (an ``encoder`` holding the block list ``layer``, or an image model holding
            ``layers``), by name or dotted suffix; None (the default) finds it (``bert.encoder``,
            ``roberta.encoder``, ``vit``) and writes its path back.
        reduction_factor: r, the side network's width is ``d / r`` (the paper's 8); it must divide ``d``.
        side_num_attention_heads: attention heads of the side blocks; None: ``gcd(base heads, d / r)``.
        side_intermediate_size: feed-forward width of the side blocks; None: the base's ``intermediate_size // r``
            (at least 1).
        gate_temperature: T in ``mu_i = sigmoid(alpha_i / T)`` (the paper's 0.1).
        gate_init: the initial gate logit ``alpha_i`` (the paper's 0, i.e. ``mu_i = 0.5``).
        init_weights: True: the up-projection starts at zero, so the model starts at the base.
        modules_to_save: modules trained in full and saved with the adapter (the classifier head).
    """

    PEFT_TYPE: ClassVar[str] = "LST"

    target_modules: list[str] | str | None = None
    reduction_factor: int = 8
    side_num_attention_heads: int | None = None
    side_intermediate_size: int | None = None
    gate_temperature: float = 0.1
    gate_init: float = 0.0
    init_weights: bool = True
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "reduction_factor", 1)
        check_int(self, "side_num_attention_heads", 1, optional=True)
        check_int(self, "side_intermediate_size", 1, optional=True)
        check_number(self, "gate_temperature", above=0)
        check_number(self, "gate_init")
        check_bool(self, "init_weights")
        ok = self.target_modules is None or isinstance(self.target_modules, str) or (
            isinstance(self.target_modules, (list, set, tuple)) and all(isinstance(t, str) for t in self.target_modules))
        self._check(ok, "target_modules", "None, a name or a list of names (matching one encoder)")
