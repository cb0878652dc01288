"""``ArrowConfig``: the options of Arrow routing and GenKnowSub (``LoraConfig(arrow_config=...)``), with peft 0.21.2's
class name, fields, defaults and order; the router itself is ``methods/lora/arrow.py``.

``task_adapter_names`` / ``gks_adapter_names`` are not constructor arguments (``init=False``, as peft):
``create_arrow_model`` fills them. They are written to ``adapter_config.json``; peft drops them when it reads the
file back (and then cannot build the router), peftkit keeps them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any, Optional

from ...config import ConfigError, is_int, is_number

FIELD = "arrow_config"


@dataclasses.dataclass
class ArrowConfig:
    """Arrow (Ostapenko et al. 2024, arXiv 2405.11157) and GenKnowSub (Bagherifard et al., ACL 2025).

    Args:
        top_k: how many LoRA experts each token is routed to (1 <= top_k <= number of task experts).
        router_temperature: temperature of the softmax over the kept experts' scores (> 0).
        use_gks: General Knowledge Subtraction: the mean of the general adapters' factors is subtracted from every
            task expert's factors before routing (``create_arrow_model(..., general_adapter_paths=[...])``).
        rng_seed: seed of the power iteration's start vector (None: the global torch generator, drawn when a layer
            first runs).
    """

    top_k: int = field(default=3, metadata={"help": "Number of top LoRA modules to combine in Arrow routing."})
    router_temperature: float = field(
        default=1.0, metadata={"help": "Softmax temperature for computing Arrow expert coefficients."})
    use_gks: bool = field(default=False, metadata={"help": "Enable GenKnowSub."})
    task_adapter_names: Optional[list[str]] = field(
        default=None, init=False,
        metadata={"help": "list of task-specific LoRA adapter names. It will be set in create_arrow_model()."})
    gks_adapter_names: Optional[list[str]] = field(
        default=None, init=False,
        metadata={"help": "list of general LoRA adapter names for GenKnowSub. It will be set in create_arrow_model()."})
    rng_seed: Optional[int] = field(
        default=None,
        metadata={"help": "Optional RNG seed for reproducibility. If None, sampling is non-deterministic."})

    def __post_init__(self) -> None:
        if not (is_int(self.top_k) and self.top_k >= 1):
            raise ConfigError(f"ArrowConfig.top_k: expected an integer >= 1, got {self.top_k!r}")
        t = self.router_temperature
        if not (is_number(t) and t > 0):
            raise ConfigError(f"ArrowConfig.router_temperature: expected a number > 0, got {t!r}")
        if not isinstance(self.use_gks, bool):
            raise ConfigError(f"ArrowConfig.use_gks: expected True or False, got {self.use_gks!r}")
        if self.rng_seed is not None and not is_int(self.rng_seed):
            raise ConfigError(f"ArrowConfig.rng_seed: expected an integer or None, got {self.rng_seed!r}")


def _names(value: Any, where: str) -> list[str] | None:
    if value is None:
        return None
    if not (isinstance(value, (list, tuple)) and all(isinstance(n, str) for n in value)):
        raise ConfigError(f"ArrowConfig.{where}: expected a list of adapter names or None, got {value!r}")
    return list(value)


def arrow_subconfig(value: Any) -> ArrowConfig | None:
    """``value`` as an ``ArrowConfig``: None, one already, a dict (read from ``adapter_config.json``: the
    ``init=False`` names are kept) or peft's own ``ArrowConfig``."""
    if value is None or isinstance(value, ArrowConfig):
        return value
    if dataclasses.is_dataclass(value) and type(value).__name__ == "ArrowConfig":  # peft's class
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if not isinstance(value, dict):
        raise ConfigError(f"LoraConfig.arrow_config: expected an ArrowConfig, a dict or None, got {value!r}")
    init = {f.name for f in dataclasses.fields(ArrowConfig) if f.init}
    cfg = ArrowConfig(**{k: v for k, v in value.items() if k in init})
    cfg.task_adapter_names = _names(value.get("task_adapter_names"), "task_adapter_names")
    cfg.gks_adapter_names = _names(value.get("gks_adapter_names"), "gks_adapter_names")
    return cfg


def check_arrow(config: Any) -> None:
    """``LoraConfig.__post_init__``: ``arrow_config`` as an ``ArrowConfig``, and what the router cannot do."""
    config.arrow_config = arrow = arrow_subconfig(config.arrow_config)
    if arrow is None:
        return
    if config.target_parameters:
        raise ConfigError("LoraConfig.arrow_config: the Arrow router adapts Linear layers only, not "
                          f"target_parameters; got target_parameters={config.target_parameters!r}")
