"""GloraConfig: field names and defaults as in Hugging Face PEFT (0.21), validated when built."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ...config import ConfigError, PeftConfig, check_bool, check_int

PATHS_A_B = ("lora", "vector", "constant", "none")
PATHS_C = ("lora", "vector", "none")
PATHS_D_E = ("vector", "constant", "none")


@dataclasses.dataclass
class GloraConfig(PeftConfig):
    """GLoRA configuration: ``W = W0 + W0 * A + B`` and ``b = b0 + b0 * D + E + W0 C``.

    Each of A, B (one setting for both), C and D, E (one setting for both) is one of

    - ``"lora"``: a low-rank product ``Xd Xu`` (A, B: (d_out, r) (r, d_in); C: (d_in, r) (r, 1)),
    - ``"vector"``: one column (A, B: (d_out, 1), broadcast over the inputs; C: (d_in, 1); D, E: (d_out,)),
    - ``"constant"``: one scalar,
    - ``"none"``: no parameter (the path is zero).

    Args:
        r: rank of the ``"lora"`` paths.
        target_modules: names (exact or dotted suffix), a full-match regex or ``"all-linear"``; None picks the
            architecture's query and value projections (PEFT's LoRA defaults).
        bias: which base biases train and are saved with the adapter: "none", "all" or "glora_only".
        modules_to_save: modules trained in full and saved with the adapter.
        config_A_B: path of A and B: "lora", "vector", "constant" or "none".
        config_C: path of C (weight-to-bias coupling): "lora", "vector" or "none".
        config_D_E: path of D and E (bias scale and shift): "vector", "constant" or "none".
        init_weights: True starts at the base model (every path zero; a lora path's ``Xu`` is random);
            False draws every path at random (Kaiming uniform, constants N(0, 0.02)).
    """

    PEFT_TYPE: ClassVar[str] = "GLORA"

    r: int = 8
    target_modules: list[str] | str | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None
    config_A_B: str = "lora"
    config_C: str = "lora"
    config_D_E: str = "constant"
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "r", 1)
        self._check(self.bias in ("none", "all", "glora_only"), "bias", "'none', 'all' or 'glora_only'")
        for field, allowed in (("config_A_B", PATHS_A_B), ("config_C", PATHS_C), ("config_D_E", PATHS_D_E)):
            value = getattr(self, field)
            if value not in allowed:
                raise ConfigError(
                    f"GloraConfig.{field}: expected one of {', '.join(repr(a) for a in allowed)}, got {value!r}"
                )
        check_bool(self, "init_weights")
