"""LoraFAConfig: LoRA's field names and defaults (peft's ``LoraConfig``) for the ones LoRA-FA uses, validated when
built. peft 0.21 has no LoRA-FA adapter type (only an optimizer, ``peft.optimizers.create_lorafa_optimizer``), so
the type name ``LORAFA`` is peftkit's; the weights file is a plain LoRA file (see ``layer.py``)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ...config import ConfigError, PeftConfig, check_bool, check_int, check_number, check_probability

INITS = (True, False, "gaussian")


@dataclasses.dataclass
class LoraFAConfig(PeftConfig):
    """LoRA-FA (Zhang et al. 2023, arXiv 2308.03303): ``h = W0 x + s B A x`` with ``A`` frozen at its random init.

    Args:
        r: rank of the update ``B A``.
        target_modules: module names (exact or dotted suffix), a full-match regex, or ``"all-linear"``; None picks
            the architecture's query and value projections (LoRA's defaults).
        exclude_modules: names or regex never to target.
        lora_alpha: scale numerator: ``s = lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``).
        lora_dropout: dropout on the adapter's input, in [0, 1). With A frozen, the backward pass keeps only the
            dropout's mask of the input, never the dropped-out input itself.
        fan_in_fan_out: the base weight is stored (in, out), as GPT-2's Conv1D (set automatically).
        bias: which base biases train and are saved with the adapter: "none", "all" or "lora_only".
        use_rslora: rank-stabilised scaling ``alpha / sqrt(r)``.
        modules_to_save: modules trained in full and saved with the adapter (e.g. a classifier head).
        init_lora_weights: True (A Kaiming-uniform, B zero: the model starts at the base), ``"gaussian"`` (A normal
            with std 1 / r, B zero) or False (B random too: not the identity; for tests).
        layers_to_transform / layers_pattern: keep only these layer indices.
    """

    PEFT_TYPE: ClassVar[str] = "LORAFA"

    r: int = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_lora_fields(self)
        check_probability(self, "lora_dropout")
        check_bool(self, "use_rslora")


def check_lora_fields(config: PeftConfig) -> None:
    """The checks of the LoRA fields the LoRA-like configs share (``r``, ``lora_alpha``, ``bias``, the init, the
    layer filter), with ``ConfigError`` naming the config class and the field."""
    check_int(config, "r", 1)
    check_number(config, "lora_alpha", above=0)
    check_bool(config, "fan_in_fan_out")
    config._check(config.bias in ("none", "all", "lora_only"), "bias", "'none', 'all' or 'lora_only'")
    init = config.init_lora_weights
    config._check(isinstance(init, bool) or init == "gaussian", "init_lora_weights", "True, False or 'gaussian'")
    name = type(config).__name__
    if isinstance(config.target_modules, str) and (config.layers_to_transform is not None or config.layers_pattern):
        raise ConfigError(f"{name}.layers_to_transform / layers_pattern: cannot be used when target_modules is a "
                          "regex string; put the layer filter into the regex")
    if config.layers_pattern and config.layers_to_transform is None:
        raise ConfigError(f"{name}.layers_pattern: only meaningful together with layers_to_transform")
