"""C3AConfig: field names and defaults as in Hugging Face PEFT, validated when built."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import field
from typing import ClassVar

from ...config import ConfigError, PeftConfig, check_int, check_pattern

INIT_CHOICES = (True, False, "gaussian", "kaiming_uniform", "xavier_uniform")


@dataclasses.dataclass
class C3AConfig(PeftConfig):
    """C3A (Chen et al. 2024, arXiv 2407.19342).

    Args:
        block_size: side ``b`` of the circulant blocks; it must divide every target's input and output size
            (``d_in d_out / b`` parameters per target: a larger block trains fewer). Without a better idea, the
            greatest common divisor of the targets' sizes.
        target_modules: names (exact or dotted suffix), a full-match regex or ``"all-linear"``; None picks the
            architecture's query and value projections (GPT-2: the MLP output projection, as PEFT).
        bias: which base biases train and are saved with the adapter: "none", "all" or "c3a_only".
        modules_to_save: modules trained in full and saved with the adapter.
        layers_to_transform / layers_pattern: keep only these layer indices.
        block_size_pattern: per-module overrides of block_size, keyed by regex (PEFT's rule: the first key
            ``k`` with ``re.match(".*\\.k$", path)``).
        init_weights: "xavier_uniform" (default; False too), "kaiming_uniform" or "gaussian" draw the kernels,
            so the model does not start at the base; True starts them at zero (no-op at the start).
    """

    PEFT_TYPE: ClassVar[str] = "C3A"

    block_size: int = 256
    target_modules: list[str] | str | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    block_size_pattern: dict | None = field(default_factory=dict)
    init_weights: bool | str | None = "xavier_uniform"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "block_size", 1)
        self._check(self.bias in ("none", "all", "c3a_only"), "bias", "'none', 'all' or 'c3a_only'")
        check_pattern(self, "block_size_pattern", integer=True)
        self._check(any(self.init_weights is c or (isinstance(c, str) and self.init_weights == c) for c in INIT_CHOICES),
                    "init_weights", "True, False, 'gaussian', 'kaiming_uniform' or 'xavier_uniform'")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ConfigError("C3AConfig.layers_to_transform: cannot be used when target_modules is a regex string")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ConfigError("C3AConfig.layers_pattern: cannot be used when target_modules is a regex string")


def block_size_for(config: C3AConfig, key: str) -> tuple[int, str]:
    """The block size of the layer at ``key`` and where it comes from (PEFT's ``block_size_pattern`` rule)."""
    for pattern, value in (config.block_size_pattern or {}).items():
        if re.match(rf".*\.{pattern}$", key):
            return int(value), f"block_size_pattern[{pattern!r}]"
    return int(config.block_size), "block_size"
