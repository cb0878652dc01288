"""HiraConfig: field names and defaults as in Hugging Face PEFT, validated when built."""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import ClassVar

from ...config import ConfigError, PeftConfig, check_bool, check_int, check_pattern, check_probability


@dataclasses.dataclass
class HiraConfig(PeftConfig):
    """HiRA (Huang et al., ICLR 2025, OpenReview TwJrTz9cRS): ``W = W0 + W0 * (B A)`` (``*``: Hadamard).

    Args:
        r: rank of the factors ``A`` (r, d_in) and ``B`` (d_out, r); the update ``W0 * BA`` is of high rank.
        target_modules: names (exact or dotted suffix), a full-match regex or ``"all-linear"``; None picks the
            architecture's query and value projections.
        exclude_modules: names or regex never to target.
        hira_dropout: dropout on the input of the adapter branch.
        fan_in_fan_out: the base weight is stored (in, out), as GPT-2's Conv1D (set automatically).
        modules_to_save: modules trained in full and saved with the adapter.
        init_weights: True: ``A`` Kaiming-uniform, ``B`` zero (the model starts at the base); ``"gaussian"``:
            ``A`` normal with std 1 / r, ``B`` zero; False: both standard normal (for tests).
        layers_to_transform / layers_pattern: keep only these layer indices.
        rank_pattern: per-module ranks, keyed by regex; validated and saved, but, as in PEFT 0.21 (whose layers
            are built with ``r``), not applied: every layer has rank ``r``.
    """

    PEFT_TYPE: ClassVar[str] = "HIRA"

    r: int = 32
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    hira_dropout: float = 0.0
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    init_weights: bool | str | None = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] | None = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "r", 1)
        check_probability(self, "hira_dropout")
        check_bool(self, "fan_in_fan_out")
        self._check(isinstance(self.init_weights, bool) or self.init_weights in ("gaussian", None),
                    "init_weights", "True, False or 'gaussian'")
        if self.rank_pattern is None:
            self.rank_pattern = {}
        check_pattern(self, "rank_pattern", integer=True)
        if isinstance(self.target_modules, (set, tuple, frozenset)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple, frozenset)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ConfigError("HiraConfig.layers_to_transform: cannot be used when target_modules is a regex string")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ConfigError("HiraConfig.layers_pattern: cannot be used when target_modules is a regex string")
