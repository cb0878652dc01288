"""ShiraConfig: field names and defaults as in Hugging Face PEFT, validated when built."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from ...config import PeftConfig, check_bool, check_int
from .functional import random_mask


@dataclasses.dataclass
class ShiraConfig(PeftConfig):
    """SHiRA (Bhardwaj et al. 2024, arXiv 2406.13175): train a sparse subset of each targeted weight.

    Args:
        r: sizes the subset as LoRA would: ``r (d_in + d_out)`` trainable entries per (d_out, d_in) weight;
            the update is not limited to rank r.
        mask_type: ``"random"`` (a random subset, see ``random_mask``); any other name needs a mask function
            set after building the config: ``config.mask_fn = fn``, ``fn(base_layer, r, **kwargs)`` returning a
            0 / 1 (d_out, d_in) mask with exactly ``r (d_in + d_out)`` ones (as in PEFT; not saved in the file).
        random_seed: seed of the random mask (None: the generator's default seed, also deterministic).
        target_modules: names (exact or dotted suffix), a full-match regex or ``"all-linear"``; None picks the
            architecture's query and value projections.
        fan_in_fan_out: the base weight is stored (in, out), as GPT-2's Conv1D (set automatically).
        init_weights: True starts the subset's deltas at zero; False draws them standard normal (for tests).
        modules_to_save: modules trained in full and saved with the adapter.
    """

    PEFT_TYPE: ClassVar[str] = "SHIRA"

    r: int = 32
    mask_type: str = "random"
    random_seed: int | None = None
    target_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    init_weights: bool = True
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "r", 1)
        check_int(self, "random_seed", optional=True)
        check_bool(self, "fan_in_fan_out", "init_weights")
        self._check(isinstance(self.mask_type, str), "mask_type", "'random' or the name of a custom mask")
        if isinstance(self.target_modules, (set, tuple, frozenset)):
            self.target_modules = sorted(self.target_modules)
        # not a field (never saved): PEFT's attribute, replaceable by the user's own mask function
        self.mask_fn: Any = random_mask if self.mask_type == "random" else None
