"""TinyLoraConfig: field names and defaults as in Hugging Face PEFT (``peft.TinyLoraConfig``), validated when built."""

from __future__ import annotations

import dataclasses
import warnings
from typing import ClassVar

from ...config import ConfigError, PeftConfig, check_bool, check_int, check_number, check_probability


@dataclasses.dataclass
class TinyLoraConfig(PeftConfig):
    """TinyLoRA configuration (PEFT's fields and defaults).

    Args:
        r: rank of the frozen SVD frame ``A`` (r x d_in), ``B`` (d_out x r) of each target (the paper uses 2);
            capped at ``min(d_out, d_in)`` per layer.
        u: length of each trained vector ``v`` (as low as 1 for extreme efficiency).
        weight_tying: how many targets share one ``v``, in [0, 1]: 0 gives each target its own, 1 one for all.
        projection_seed: seed of the fixed random projections ``P`` (layer ``i`` draws from ``seed + i``).
        save_projection: also save each layer's ``P`` (else they are regenerated from the seed on load).
        init_v_bound: ``init_weights="uniform"`` draws ``v`` in [-bound, bound].
        target_modules: names (exact or dotted suffix), a full-match regex or ``"all-linear"``; None picks the
            architecture's default (PEFT's: LoRA's table). Linear, GPT-2 Conv1D and Embedding layers.
        tinylora_dropout: dropout on the adapter branch's input (Embedding: on the looked-up rows of ``B``).
        fan_in_fan_out: the base weight is stored (in, out), as GPT-2's Conv1D (set automatically).
        bias: which base biases train and are saved with the adapter: "none", "all" or "tinylora_only".
        modules_to_save: modules trained in full and saved with the adapter.
        init_weights: True: ``v`` starts at 0 (the model starts at the base); "uniform": in
            [-init_v_bound, init_v_bound]; False: left uninitialised (``torch.empty``).
        layers_to_transform / layers_pattern: keep only these layer indices.
    """

    PEFT_TYPE: ClassVar[str] = "TINYLORA"

    r: int = 2
    u: int = 64
    weight_tying: float = 0.0
    projection_seed: int = 42
    save_projection: bool = True
    init_v_bound: float = 0.02
    target_modules: list[str] | str | None = None
    tinylora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "r", 1)
        check_int(self, "u", 1)
        check_probability(self, "weight_tying", closed=True)
        check_int(self, "projection_seed")
        check_number(self, "init_v_bound", minimum=0)
        check_probability(self, "tinylora_dropout")
        check_bool(self, "save_projection", "fan_in_fan_out")
        self._check(isinstance(self.init_weights, bool) or self.init_weights == "uniform", "init_weights",
                    "True, False or 'uniform'")
        self._check(self.bias in ("none", "all", "tinylora_only"), "bias", "'none', 'all' or 'tinylora_only'")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("TinyLoraConfig.layers_pattern: only meaningful together with layers_to_transform")
        if not self.save_projection:
            warnings.warn(
                "TinyLoraConfig.save_projection=False: the projection tensors P are not saved and are restored from "
                "projection_seed on load; set save_projection=True to restore the checkpoint exactly on every "
                "system configuration", stacklevel=3,
            )
