"""DeloraConfig: field names and defaults as in Hugging Face PEFT, validated when built."""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import ClassVar

from ...config import ConfigError, PeftConfig, check_bool, check_int, check_number, check_pattern, check_probability, is_number


@dataclasses.dataclass
class DeloraConfig(PeftConfig):
    """DeLoRA (Bini et al. 2025, arXiv 2503.18225).

    Args:
        r: rank of the factors ``A`` (r, d_in) and ``B`` (d_out, r).
        delora_lambda: initial value of the trained boundary ``lambda`` (a bound on the update's norm).
        module_dropout: dropout on the adapter branch's input (PEFT's name; it drops input features).
        target_modules: names (exact or dotted suffix), a full-match regex or ``"all-linear"``; None picks
            the architecture's query and value projections.
        exclude_modules: names or regex never to target.
        bias: which base biases train and are saved with the adapter: "none", "all" or "delora_only".
        init_weights: True: ``A`` Kaiming uniform, ``B`` zero (the model starts at the base); False: both random.
        layers_to_transform / layers_pattern: keep only these layer indices.
        rank_pattern / lambda_pattern: per-module overrides of r / delora_lambda, keyed by regex.
        modules_to_save: modules trained in full and saved with the adapter.
    """

    PEFT_TYPE: ClassVar[str] = "DELORA"

    r: int = 8
    delora_lambda: int = 15
    module_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    bias: str = "none"
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict = field(default_factory=dict)
    lambda_pattern: dict = field(default_factory=dict)
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "r", 1)
        check_number(self, "delora_lambda")
        check_probability(self, "module_dropout")
        check_bool(self, "init_weights")
        self._check(self.bias in ("none", "all", "delora_only"), "bias", "'none', 'all' or 'delora_only'")
        check_pattern(self, "rank_pattern", integer=True)
        for key, value in (self.lambda_pattern or {}).items():
            if not is_number(value):
                raise ConfigError(f"DeloraConfig.lambda_pattern[{key!r}]: expected a number, got {value!r}")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ConfigError("DeloraConfig.layers_to_transform: cannot be used when target_modules is a regex string")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("DeloraConfig.layers_pattern: only meaningful together with layers_to_transform")
