"""WaveFTConfig: field names and defaults as in Hugging Face PEFT, validated when built."""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import ClassVar

from ...config import ConfigError, PeftConfig, check_bool, check_int, check_number, check_pattern

# The wavelet families PEFT accepts, with the filter length of each: db_k and sym_k have 2k taps, coif_k 6k.
# PEFT's WAVELET_REDUCTIONS lists exactly these (its reduction is the filter length minus 2).
FILTER_LENGTHS: dict[str, int] = {
    **{f"db{k}": 2 * k for k in range(1, 39)},
    **{f"sym{k}": 2 * k for k in range(2, 21)},
    **{f"coif{k}": 6 * k for k in range(1, 18)},
}


@dataclasses.dataclass
class WaveFTConfig(PeftConfig):
    """WaveFT (Bilican et al. 2025, arXiv 2505.12532).

    Args:
        n_frequency: learned wavelet coefficients per targeted layer (1 .. d_out * d_in).
        scaling: multiplies the reconstructed update (LoRA's alpha; 25 for SDXL personalisation in the paper).
        wavelet_family: the wavelet of the inverse transform: db1..db38, sym2..sym20 or coif1..coif17
            ("db1" = Haar).
        use_idwt: True: the update is the inverse 2-D wavelet transform of the sparse coefficients; False: the
            coefficients are placed directly in the update (a sparse update, no transform).
        random_loc_seed: seed of the coefficients' random positions.
        fan_in_fan_out: the base weight is stored (in, out), as GPT-2's Conv1D (set automatically).
        target_modules: names (exact or dotted suffix), a full-match regex or ``"all-linear"``; None picks
            the architecture's query and value projections (GPT-2: the MLP output projection, as PEFT).
        exclude_modules: names or regex never to target.
        bias: which base biases train and are saved with the adapter: "none", "all" or "waveft_only".
        modules_to_save: modules trained in full and saved with the adapter.
        layers_to_transform / layers_pattern: keep only these layer indices.
        n_frequency_pattern: per-module overrides of n_frequency, keyed by regex.
        proportional_parameters: share ``n_frequency x (number of targets)`` among the targets in proportion
            to ``d_in d_out`` (at least 1 each; overrides ``n_frequency_pattern``).
        init_weights: True: coefficients start at zero (the identity); False: ``0.01 x`` standard normal.
    """

    PEFT_TYPE: ClassVar[str] = "WAVEFT"

    n_frequency: int = 2592
    scaling: float = 25.0
    wavelet_family: str = "db1"
    use_idwt: bool = True
    random_loc_seed: int = 777
    fan_in_fan_out: bool = False
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    n_frequency_pattern: dict = field(default_factory=dict)
    proportional_parameters: bool = False
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "n_frequency", 1)
        check_number(self, "scaling")
        check_int(self, "random_loc_seed")
        self._check(self.wavelet_family in FILTER_LENGTHS, "wavelet_family",
                    "one of db1..db38, sym2..sym20, coif1..coif17")
        self._check(self.bias in ("none", "all", "waveft_only"), "bias", "'none', 'all' or 'waveft_only'")
        check_bool(self, "use_idwt", "fan_in_fan_out", "proportional_parameters", "init_weights")
        if self.n_frequency_pattern is None:
            self.n_frequency_pattern = {}
        check_pattern(self, "n_frequency_pattern", integer=True)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ConfigError("WaveFTConfig.layers_to_transform: cannot be used when target_modules is a regex "
                              "string; put the layer filter into the regex")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ConfigError("WaveFTConfig.layers_pattern: cannot be used when target_modules is a regex string")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("WaveFTConfig.layers_pattern: only meaningful together with layers_to_transform")
