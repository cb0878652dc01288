"""OSFConfig: field names and defaults as in Hugging Face PEFT, validated when built."""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any, ClassVar

from ...config import ConfigError, PeftConfig, is_number

_RANK = "None, an integer > 0 or a fraction in (0, 1] of the smaller weight dimension"


def _rank_ok(value: Any) -> bool:
    """PEFT's rule: an int counts singular directions, a float in (0, 1] is a fraction of min(d_out, d_in)
    (a float above 1 is truncated to an int, as PEFT does)."""
    return is_number(value) and value > 0


@dataclasses.dataclass
class OSFConfig(PeftConfig):
    """OSF, orthogonal subspace fine-tuning (Nayak et al. 2025, arXiv 2504.07097).

    Args:
        effective_rank: the preserved ("high") SVD rank k of each target weight; its top-k singular directions
            are frozen, the other ``min(d_out, d_in) - k`` train. An int, or a float in (0, 1] read as a
            fraction of ``min(d_out, d_in)``; None: half of it.
        target_modules: names (exact or dotted suffix), a full-match regex or ``"all-linear"``; None picks PEFT's
            OSF table for the architecture (every attention and MLP projection), else every linear layer.
        rank_pattern: regex (searched in the module path; the first that matches wins) -> effective_rank.
        init_weights: True: the trainable factors start at the weight's own low singular components (the
            model starts at the base); False: they are drawn from a standard normal (tests).
        modules_to_save: modules trained in full and saved with the adapter.
        target_svd_config: accepted and ignored, as in PEFT.
    """

    PEFT_TYPE: ClassVar[str] = "OSF"

    effective_rank: int | float | None = None
    target_modules: list[str] | str | None = None
    rank_pattern: dict[str, int | float] | None = None
    init_weights: bool | None = True
    modules_to_save: list[str] | None = None
    target_svd_config: dict[str, int] | None = field(default=None)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check(self.effective_rank is None or _rank_ok(self.effective_rank), "effective_rank", _RANK)
        self._check(self.init_weights in (True, False, None), "init_weights", "True or False (None: True, as PEFT)")
        if self.rank_pattern is not None and not isinstance(self.rank_pattern, dict):
            self._check(False, "rank_pattern", "None or a dict: module regex -> effective_rank")
        for key, value in (self.rank_pattern or {}).items():
            if not _rank_ok(value):
                raise ConfigError(f"OSFConfig.rank_pattern[{key!r}]: expected an integer > 0 or a fraction in "
                                  f"(0, 1], got {value!r}")
