"""PveraConfig: field names and defaults as in Hugging Face PEFT, validated when built."""

from __future__ import annotations

import dataclasses
import warnings
from typing import ClassVar

from ...config import ConfigError, PeftConfig, check_bool, check_int, check_number, check_probability


@dataclasses.dataclass
class PveraConfig(PeftConfig):
    """PVeRA configuration (Hugging Face PEFT's fields and defaults).

    Args:
        r: rank of the shared random projections: ``A`` has ``2 r`` rows (mean and log-variance), ``B`` has
            ``r`` columns. Larger than LoRA ranks (256 by default): the projections are shared and frozen.
        target_modules: names (exact or dotted suffix), a full-match regex or ``"all-linear"``; None picks
            the architecture's query and value projections.
        projection_prng_key: seed of the shared projections ``A`` and ``B`` (the same for every PVeRA adapter
            on a model).
        save_projection: write ``A`` and ``B`` into the adapter file; when False they are regenerated from
            ``projection_prng_key`` on load.
        pvera_dropout: dropout on the layer input of the adapter branch.
        d_initial: initial value of every entry of ``d`` (2 r entries).
        fan_in_fan_out: the base weight is stored (in, out), as GPT-2's Conv1D (set automatically).
        bias: which base biases train and are saved with the adapter: "none", "all" or "pvera_only".
        modules_to_save: modules trained in full and saved with the adapter.
        init_weights: True starts ``b`` at 0 and ``d`` at ``d_initial``; False (for tests) ``b`` at 1 and
            ``d`` standard normal, so the model does not start at the base.
        layers_to_transform / layers_pattern: keep only these layer indices.
        sample_at_inference: also sample the latent in eval mode (False: the learned mean, deterministic).
        generator_seed: seed of each layer's own CPU generator for the sampling noise; None draws from the
            global torch generator.
    """

    PEFT_TYPE: ClassVar[str] = "PVERA"

    r: int = 256
    target_modules: list[str] | str | None = None
    projection_prng_key: int = 0
    save_projection: bool = True
    pvera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    sample_at_inference: bool = False
    generator_seed: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "r", 1)
        check_int(self, "projection_prng_key")
        check_bool(self, "save_projection", "init_weights", "sample_at_inference")
        check_probability(self, "pvera_dropout")
        check_number(self, "d_initial")
        self._check(self.bias in ("none", "all", "pvera_only"), "bias", "'none', 'all' or 'pvera_only'")
        check_int(self, "generator_seed", optional=True, expected="an integer or None")
        if isinstance(self.target_modules, (set, tuple, frozenset)):
            self.target_modules = sorted(self.target_modules)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("PveraConfig.layers_pattern: only meaningful together with layers_to_transform")
        if not self.save_projection:
            warnings.warn(
                "PveraConfig.save_projection=False: pvera_A / pvera_B are not saved and will be regenerated from "
                "projection_prng_key on load", stacklevel=3,
            )
