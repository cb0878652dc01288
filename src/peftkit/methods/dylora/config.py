"""DyLoraConfig: LoRA's field names and defaults (peft's ``LoraConfig``) for the ones DyLoRA uses, plus the rank
range and the inference rank; validated when built. The type name ``DYLORA`` is peftkit's (peft 0.21 has no
DyLoRA)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ...config import PeftConfig, check_bool, check_int, check_probability
from ..lorafa.config import check_lora_fields


@dataclasses.dataclass
class DyLoraConfig(PeftConfig):
    """DyLoRA (Valipour et al. 2023, arXiv 2210.07558): each training step samples a rank ``b`` uniformly from
    ``[r_min, r]`` and the layer computes ``W0 x + (lora_alpha / b) B[:, :b] A[:b] x``; at inference any rank
    ``k <= r`` is the truncated LoRA ``(lora_alpha / k) B[:, :k] A[:k]``.

    Args:
        r: the largest rank (``A`` (r, d_in), ``B`` (d_out, r) are stored whole).
        r_min: the smallest rank a training step samples (1 <= r_min <= r).
        target_modules: module names (exact or dotted suffix), a full-match regex, or ``"all-linear"``; None picks
            the architecture's query and value projections (LoRA's defaults).
        exclude_modules: names or regex never to target.
        lora_alpha: scale numerator: rank b computes with ``lora_alpha / b``.
        lora_dropout: dropout on the adapter's input, in [0, 1).
        fan_in_fan_out: the base weight is stored (in, out), as GPT-2's Conv1D (set automatically).
        bias: which base biases train and are saved with the adapter: "none", "all" or "lora_only".
        modules_to_save: modules trained in full and saved with the adapter (e.g. a classifier head).
        init_lora_weights: True (A Kaiming-uniform, B zero: the model starts at the base), ``"gaussian"`` (A normal
            with std 1 / r, B zero) or False (B random too: not the identity; for tests).
        layers_to_transform / layers_pattern: keep only these layer indices.
        frozen: the paper's "frozen" update: a step at rank b trains only row b of A and column b of B (the rows
            and columns below b are used but not updated); False trains all of the first b.
        inference_rank: the rank used outside training (``model.eval()``); None: r. ``set_rank(model, k)`` sets it
            (and so it is saved with the adapter). Ranks below ``r_min`` are valid but were never trained alone.
    """

    PEFT_TYPE: ClassVar[str] = "DYLORA"

    r: int = 8
    r_min: int = 1
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    frozen: bool = False
    inference_rank: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_lora_fields(self)
        check_int(self, "r_min", 1, expected=f"an integer in [1, r={self.r}]")
        self._check(self.r_min <= self.r, "r_min", f"an integer in [1, r={self.r}]")
        check_probability(self, "lora_dropout")
        check_bool(self, "frozen")
        check_int(self, "inference_rank", 1, optional=True, expected=f"None or an integer in [1, r={self.r}]")
        self._check(self.inference_rank is None or self.inference_rank <= self.r, "inference_rank",
                    f"None or an integer in [1, r={self.r}]")

    @property
    def rank(self) -> int:
        """The rank used outside training."""
        return self.r if self.inference_rank is None else self.inference_rank
