"""SVDiffConfig: which layers get a spectral shift; validated when built."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ...config import PeftConfig


@dataclasses.dataclass
class SVDiffConfig(PeftConfig):
    """SVDiff (Han et al. 2023, arXiv 2303.11305): a trained shift of each targeted weight's singular values,
    ``W' = U diag(ReLU(sigma + delta)) V^T``, with ``U``, ``sigma``, ``V`` frozen.

    Args:
        target_modules: names (exact or dotted suffix), a full-match regex or ``"all-linear"``; None: every
            Linear, GPT-2 Conv1D and Conv1d / Conv2d / Conv3d of the model except the output embedding and the
            task head (the paper shifts every weight matrix of the UNet, convolutions included).
        exclude_modules: names or regex never to adapt.
        modules_to_save: modules trained in full and saved with the adapter (the task head is added for
            classification task types).
    """

    PEFT_TYPE: ClassVar[str] = "SVDIFF"

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        # target_modules / exclude_modules are checked (and made sets) by PeftConfig, as peft's name fields
        names = self.modules_to_save
        self._check(names is None or (isinstance(names, (list, tuple)) and all(isinstance(n, str) and n for n in names)),
                    "modules_to_save", "None or a list of non-empty module names")
        if isinstance(names, tuple):
            self.modules_to_save = list(names)
