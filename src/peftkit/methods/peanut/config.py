"""PeanutConfig: field names and defaults as in Hugging Face PEFT, validated when built."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from transformers.activations import ACT2FN

from ...config import PeftConfig, check_bool, check_int, check_number


@dataclasses.dataclass
class PeanutConfig(PeftConfig):
    """PEANuT (Zhong et al. 2024, arXiv 2410.01870).

    Args:
        r: hidden width of the tweaker network (``A``: d_out -> r, ``B``: r -> d_out).
        depth: hidden r x r layers per side (``depth`` encoders and ``depth`` decoders with residuals); 0: ``A``, ``B``.
        act_fn: the network's non-linearity, a key of ``transformers.activations.ACT2FN`` ("relu").
        scaling: factor on the update (``scaling * x dW^T`` is added to the layer's output).
        target_modules: names (exact or dotted suffix), a full-match regex or ``"all-linear"``; None picks
            the architecture's query and value projections.
        exclude_modules: names or regex never to target.
        modules_to_save: modules trained in full and saved with the adapter.
        layers_to_transform / layers_pattern: keep only these layer indices.
        init_weights: True: ``B`` zero (the model starts at the base), the rest Kaiming uniform; False: all random.
    """

    PEFT_TYPE: ClassVar[str] = "PEANUT"

    r: int = 32
    depth: int = 0
    act_fn: str = "relu"
    scaling: float = 1.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "r", 1)
        check_int(self, "depth", 0)
        check_number(self, "scaling")
        check_bool(self, "init_weights")
        self._check(isinstance(self.act_fn, str) and self.act_fn in ACT2FN, "act_fn",
                    f"one of transformers' ACT2FN keys {sorted(ACT2FN)}")
        self._check(not (self.layers_pattern and self.layers_to_transform is None), "layers_pattern",
                    "None unless layers_to_transform is set")
