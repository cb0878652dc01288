"""UniLoraConfig: field names and defaults as in Hugging Face PEFT (``peft.UniLoraConfig``), validated when built."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ...config import ConfigError, PeftConfig, check_bool, check_int, check_number, check_probability


@dataclasses.dataclass
class UniLoraConfig(PeftConfig):
    """Uni-LoRA configuration (PEFT's fields and defaults).

    Args:
        r: rank of every layer's factors ``A`` (r x d_in) and ``B`` (d_out x r).
        proj_seed: seed of the fixed assignment of LoRA entries to entries of ``theta_d``.
        theta_d_length: length ``d`` of the one trained vector ``theta_d``.
        target_modules: names (exact or dotted suffix), a full-match regex or ``"all-linear"``; None picks the
            architecture's default (PEFT's: LoRA's table).
        unilora_dropout: dropout on the layer input of the adapter branch.
        fan_in_fan_out: the base weight is stored (in, out), as GPT-2's Conv1D (set automatically).
        bias: which base biases train and are saved with the adapter: "none", "all" or "unilora_only".
        modules_to_save: modules trained in full and saved with the adapter.
        init_theta_d_bound: ``theta_d`` starts uniform in [-bound, bound] (``init_weights=True``).
        init_weights: True: the uniform start above; False: standard normal.
        save_indices: also save each layer's indices and scales (the file no longer depends on regenerating
            the assignment from ``proj_seed``).
        layers_to_transform / layers_pattern: keep only these layer indices.
    """

    PEFT_TYPE: ClassVar[str] = "UNILORA"

    r: int = 4
    proj_seed: int = 42
    theta_d_length: int = 256
    target_modules: list[str] | str | None = None
    unilora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_theta_d_bound: float = 0.02
    init_weights: bool = True
    save_indices: bool = False
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "r", 1)
        check_int(self, "proj_seed", 0)
        check_int(self, "theta_d_length", 1)
        check_probability(self, "unilora_dropout")
        check_number(self, "init_theta_d_bound", above=0)
        check_bool(self, "fan_in_fan_out", "init_weights", "save_indices")
        self._check(self.bias in ("none", "all", "unilora_only"), "bias", "'none', 'all' or 'unilora_only'")
        if isinstance(self.target_modules, (set, tuple, frozenset)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.target_modules, str) and (self.layers_to_transform is not None or self.layers_pattern):
            raise ConfigError("UniLoraConfig.layers_to_transform: cannot be used when target_modules is a regex "
                              "string; put the layer filter into the regex")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("UniLoraConfig.layers_pattern: only meaningful together with layers_to_transform")
