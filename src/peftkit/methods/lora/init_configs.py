"""The sub-configs of LoRA's data-driven initialisations, with peft's field names, defaults and checks:
``EvaConfig`` (``init_lora_weights="eva"``), ``CordaConfig`` ("corda") and ``LoraGAConfig`` ("lora_ga").

``LoraConfig`` keeps them as these dataclasses; a dict (an ``adapter_config.json`` read back) becomes one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any, Literal, Optional

from ...config import ConfigError


@dataclasses.dataclass
class EvaConfig:
    """EVA, Explained Variance Adaptation (Paischer et al. 2024, arXiv 2410.07170): lora_A starts from the top
    right-singular vectors of each layer's inputs on data, ranks redistributed by explained variance.

    Args:
        rho: the largest rank a layer may get is ``r * rho`` (>= 1; 1 means no redistribution).
        tau: cosine-similarity threshold between two incremental-SVD steps for a component to count as converged.
        use_label_mask: leave out positions whose label is ``label_mask_value`` (causal LM inputs with ``labels``).
        label_mask_value: the ignored label (default -100).
        whiten: divide each singular vector by the square root of its singular value.
        adjust_scaling_factors: scale ``lora_alpha`` by ``new_rank / r`` where a layer's rank changed.
    """

    rho: float = field(default=2.0, metadata={"help": "Rho value for EVA redistribution"})
    tau: float = field(default=0.99, metadata={"help": "Cosine similarity threshold for early stopping"})
    use_label_mask: bool = field(default=True, metadata={"help": "Use label mask for EVA initialization"})
    label_mask_value: int = field(default=-100, metadata={"help": "label value ignored when use_label_mask=True"})
    whiten: bool = field(default=False, metadata={"help": "Apply whitening to singular vectors"})
    adjust_scaling_factors: bool = field(default=True, metadata={"help": "Adjust LoRA scaling factors after the rank "
                                                                          "redistribution"})

    def __post_init__(self) -> None:
        if self.rho < 1.0:
            raise ConfigError(f"EvaConfig.rho: expected a number >= 1.0, got {self.rho!r}")
        if self.tau < 0.0 or self.tau > 1.0:
            raise ConfigError(f"EvaConfig.tau: expected a number in [0.0, 1.0], got {self.tau!r}")


@dataclasses.dataclass
class CordaConfig:
    """CorDA, context-oriented decomposition adaptation (Yang et al. 2024, arXiv 2406.05223): the SVD of
    ``W C`` (C: the covariance of the layer's inputs on data) splits W into an adapter and a residual.

    Args:
        cache_file: file for the per-layer SVD factors (written once, read back instead of recomputing).
        covariance_file: file for the per-layer covariance matrices (reusable for another rank).
        corda_method: "ipm" (instruction-previewed: the adapter takes the largest components) or "kpm"
            (knowledge-preserved: the adapter takes the smallest, the residual keeps the model's knowledge).
        verbose: show progress.
        use_float16_for_covariance: accumulate the covariance in the inputs' dtype instead of float32.
        prune_temporary_fields: drop the per-layer temporaries (covariance, counts) after preprocessing.
    """

    cache_file: Optional[str] = field(default=None, metadata={"help": "File to store the SVD cache"})
    covariance_file: Optional[str] = field(default=None, metadata={"help": "File to store the covariance matrix"})
    corda_method: Literal["ipm", "kpm"] = field(default="ipm", metadata={"help": "'ipm' or 'kpm'"})
    verbose: bool = field(default=False, metadata={"help": "Print the progress of CorDA initialization"})
    use_float16_for_covariance: bool = field(default=False, metadata={"help": "float16 covariance matrices"})
    prune_temporary_fields: bool = field(default=True, metadata={"help": "Prune temporary CorDA fields"})


@dataclasses.dataclass
class LoraGAConfig:
    """LoRA-GA, low-rank adaptation with gradient approximation (Wang et al. 2024, arXiv 2407.05000): A and B
    start from the SVD of the full weight's gradient on data; the base weight gives up ``s B A``.

    Args:
        direction: which of the gradient's 2r singular components go to A and to B: "ArBr" (alternating),
            "A2rBr" (A: r..2r, B: 0..r), "ArB2r" (A: 0..r, B: r..2r; the default) or "random".
        scale: "stable" (B times ``d_out^(1/4) / sqrt(stable_gamma)``), "weight_svd", "gd_scale" or "unit".
        stable_gamma: gamma of the "stable" scale.
    """

    direction: Literal["ArBr", "A2rBr", "ArB2r", "random"] = field(
        default="ArB2r", metadata={"help": "Component distribution strategy from gradient SVD"})
    scale: Literal["stable", "weight_svd", "gd_scale", "unit"] = field(
        default="stable", metadata={"help": "Scaling strategy for initialization"})
    stable_gamma: int = field(default=16, metadata={"help": "Gamma parameter for stable scaling"})

    def __post_init__(self) -> None:
        if self.direction not in ("ArBr", "A2rBr", "ArB2r", "random"):
            raise ConfigError(f"LoraGAConfig.direction: expected 'ArBr', 'A2rBr', 'ArB2r' or 'random', "
                              f"got {self.direction!r}")
        if self.scale not in ("stable", "weight_svd", "gd_scale", "unit"):
            raise ConfigError(f"LoraGAConfig.scale: expected 'stable', 'weight_svd', 'gd_scale' or 'unit', "
                              f"got {self.scale!r}")


def subconfig(value: Any, cls: type, where: str) -> Any:
    """``value`` as a ``cls`` (peft's ``_get_lora_subconfig``): None stays None, a dict (read from JSON) is
    converted, dropping keys the class does not take as arguments."""
    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, dict):
        keys = {f.name for f in dataclasses.fields(cls) if f.init}
        return cls(**{k: v for k, v in value.items() if k in keys})
    if dataclasses.is_dataclass(value) and type(value).__name__ == cls.__name__:  # peft's own class
        return cls(**dataclasses.asdict(value))
    raise ConfigError(f"LoraConfig.{where}: expected a {cls.__name__}, a dict or None, got {value!r}")
