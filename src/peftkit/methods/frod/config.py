"""FrodConfig: field names and defaults as in Hugging Face PEFT (``peft.FrodConfig``, 0.21), validated when built."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ...config import ConfigError, PeftConfig, check_bool, check_int, check_number, check_probability


@dataclasses.dataclass
class FrodConfig(PeftConfig):
    """FRoD configuration (AAAI-26, doi 10.1609/aaai.v40i31.39813).

    Args:
        target_modules: names (exact or dotted suffix), a full-match regex or ``"all-linear"``; None picks the
            architecture's query and value projections (PEFT's VeRA table). Linear and GPT-2 Conv1D only.
        projection_prng_key: seed of the sparse COO patterns of ``S`` (one draw per module category, in
            sorted category order, from one CPU generator).
        save_projection: write the shared bases ``V`` and the sparse patterns into the adapter file (else they
            are rebuilt from the base weights and the seed on load).
        frod_dropout: dropout on the adapter branch's input.
        fan_in_fan_out: the base weight is stored (in, out), as GPT-2's Conv1D (set automatically).
        bias: which base biases train and are saved with the adapter: "none", "all" or "frod_only".
        modules_to_save: modules trained in full and saved with the adapter.
        init_weights: True: the sparse values start at 0 and ``lambda_l`` at the column norms, so the model
            starts at the base; False (tests): sparse values N(0, 0.1^2), ``lambda_l`` plus N(0, 0.1^2) noise.
        layers_to_transform / layers_pattern: keep only these layer indices.
        sparse_rate: fraction of the d_in x d_in entries of ``S`` that train (off-diagonal only), in [0, 1].
        regularization_alpha: ridge term of the inverse that builds the shared basis from correlated layers.
        progressbar: PEFT shows a progress bar while building the bases (accepted; peftkit shows none).
        runtime_offload_base_weight: PEFT may keep target base weights on CPU while FRoD runs (accepted for file
            compatibility; peftkit keeps the base weight where it is).
    """

    PEFT_TYPE: ClassVar[str] = "FROD"

    target_modules: list[str] | str | None = None
    projection_prng_key: int = 0
    save_projection: bool = True
    frod_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    sparse_rate: float = 0.01
    regularization_alpha: float = 1e-3
    progressbar: bool = True
    runtime_offload_base_weight: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "projection_prng_key")
        check_bool(self, "save_projection", "fan_in_fan_out", "init_weights", "progressbar",
                   "runtime_offload_base_weight")
        check_probability(self, "frod_dropout")
        check_probability(self, "sparse_rate", closed=True)
        check_number(self, "regularization_alpha", minimum=0)
        self._check(self.bias in ("none", "all", "frod_only"), "bias", "'none', 'all' or 'frod_only'")
        if isinstance(self.target_modules, (set, tuple, frozenset)):
            self.target_modules = sorted(self.target_modules)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("FrodConfig.layers_pattern: only meaningful together with layers_to_transform")
