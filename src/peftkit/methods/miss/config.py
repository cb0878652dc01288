"""MissConfig: field names and defaults as in Hugging Face PEFT, validated when built."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ...config import ConfigError, PeftConfig, check_int, check_probability


@dataclasses.dataclass
class MissConfig(PeftConfig):
    """MiSS (Kang & Yin, arXiv 2409.15371; PEFT's former ``BoneConfig``).

    Args:
        r: shard width along the input dimension (default variant: the block is (r, d_out)); an even r is
            recommended. Must not exceed any targeted layer's input width; ``"bat"`` needs r to divide both
            the input and output widths.
        miss_dropout: dropout on the input of the adapter branch (not used by ``"bat"``, as in PEFT).
        mini_r: with ``init_weights="mini"``, the block is (r, mini_r), tiled ``d_out / mini_r`` times along the
            output dimension (``mini_r`` must divide every targeted layer's output width).
        target_modules: names (exact or dotted suffix), a full-match regex or ``"all-linear"``; None picks the
            architecture's query and value projections.
        exclude_modules: names or regex never to target.
        init_weights: True: the default ("balance") variant, block zero; ``"bat"``: (d_out / r) blocks
            (r, r) acting on the weight's own shards (non-linear update); ``"mini"``: see ``mini_r``; False:
            a random (Kaiming-uniform) (r, d_out) block, for tests.
        layers_to_transform / layers_pattern: keep only these layer indices.
        bias: which base biases train: "none", "all" or "MiSS_only".
        modules_to_save: modules trained in full and saved with the adapter.
    """

    PEFT_TYPE: ClassVar[str] = "MISS"

    r: int = 64
    miss_dropout: float = 0.0
    mini_r: int = 1
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    init_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "r", 1)
        check_int(self, "mini_r", 1)
        check_probability(self, "miss_dropout")
        self._check(isinstance(self.init_weights, bool) or self.init_weights in ("bat", "mini"),
                    "init_weights", "True, False, 'bat' or 'mini'")
        self._check(self.bias in ("none", "all", "MiSS_only"), "bias", "'none', 'all' or 'MiSS_only'")
        if isinstance(self.target_modules, (set, tuple, frozenset)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple, frozenset)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ConfigError("MissConfig.layers_to_transform: cannot be used when target_modules is a regex string")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ConfigError("MissConfig.layers_pattern: cannot be used when target_modules is a regex string")
