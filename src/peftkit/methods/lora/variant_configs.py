"""The sub-configs of LoRA's variants and runtime options, with peft 0.21.2's names, fields, defaults and checks:
``KasaConfig`` (``kasa_config``: KaSA, methods/lora/kasa.py), ``LoraRuntimeConfig`` (``runtime_config``: options
of this process only, never saved: ``LoraConfig.to_dict`` drops it, as peft).

``LoraConfig`` keeps them as these dataclasses; a dict (an ``adapter_config.json`` read back) becomes one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any

from ...config import ConfigError
from .init_configs import subconfig

# peft's LoRA variant fields (``is_lora_variant`` in its LoraConfig): on one layer at most one may be set (peft's
# ``resolve_lora_variant`` accepts no combination); the ones peftkit implements are checked by ``check_variants``
VARIANT_FIELDS = ("use_dora", "alora_invocation_tokens", "kasa_config")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclasses.dataclass
class KasaConfig:
    """KaSA, knowledge-aware singular-value adaptation (Wang et al. 2024, arXiv 2412.06071).

    Args:
        beta: weight of the singular-value penalty ``sum(lora_diag ** 2)`` (paper eq. 9-10).
        gamma: weight of the orthogonality penalty ``||B^T B - I||_F + ||A A^T - I||_F`` (paper eq. 11).
    Both act only through ``kasa_loss`` (peft's ``_get_kasa_loss``), which the training loop adds to its loss.
    """

    beta: float = field(default=1e-4, metadata={"help": "Coefficient of the L2 penalty on lora_diag"})
    gamma: float = field(default=1e-3, metadata={"help": "Coefficient of the orthogonal regularization of A, B"})

    def __post_init__(self) -> None:
        for name in ("beta", "gamma"):
            value = getattr(self, name)
            if not _number(value) or value < 0:
                raise ConfigError(f"KasaConfig.{name}: expected a number >= 0, got {value!r}")


@dataclasses.dataclass
class LoraRuntimeConfig:
    """Options of this process only (peft's ``LoraRuntimeConfig``; never written to ``adapter_config.json``).

    Args:
        ephemeral_gpu_offload: DoRA's initial magnitude ``||W0 + s B A||`` of an adapter kept in CPU memory is
            computed on the GPU (CUDA, else XPU) and moved back (the values as a GPU computes them, as peft);
            ``PeftModel.from_pretrained(..., ephemeral_gpu_offload=True)`` asks for it at load.
    """

    ephemeral_gpu_offload: bool = field(default=False, metadata={"help": "Ephemeral GPU offloading (DoRA init)"})

    def __post_init__(self) -> None:
        if not isinstance(self.ephemeral_gpu_offload, bool):
            raise ConfigError("LoraRuntimeConfig.ephemeral_gpu_offload: expected True or False, got "
                              f"{self.ephemeral_gpu_offload!r}")


def check_variants(config: Any) -> None:
    """``LoraConfig.__post_init__``: the variant sub-configs as dataclasses, and what peft refuses beside them."""
    config.kasa_config = subconfig(config.kasa_config, KasaConfig, "kasa_config")
    runtime = config.runtime_config
    if runtime is None:
        config.runtime_config = LoraRuntimeConfig()
    elif isinstance(runtime, dict):
        config.runtime_config = subconfig(runtime, LoraRuntimeConfig, "runtime_config")
    elif not (isinstance(runtime, LoraRuntimeConfig) or type(runtime).__name__ == "LoraRuntimeConfig"):
        raise ConfigError(f"LoraConfig.runtime_config: expected a LoraRuntimeConfig, a dict or None, got {runtime!r}")
    elif not isinstance(runtime, LoraRuntimeConfig):  # peft's own class
        config.runtime_config = LoraRuntimeConfig(**dataclasses.asdict(runtime))
    on = [f for f in VARIANT_FIELDS if getattr(config, f, None) not in (None, False)]
    if len(on) > 1:
        raise ConfigError(f"LoraConfig.{on[-1]}: cannot be combined with {on[0]} (peft accepts one LoRA variant per "
                          f"layer: {', '.join(VARIANT_FIELDS)}); set only one of them")
    if config.kasa_config is not None:
        if config.target_parameters:
            raise ConfigError("LoraConfig.kasa_config: KaSA adapts nn.Linear layers only, not target_parameters "
                              f"(peft refuses it too); got target_parameters={config.target_parameters!r}")
        if config.fan_in_fan_out:
            raise ConfigError("LoraConfig.kasa_config: KaSA does not support fan_in_fan_out=True (e.g. GPT-2's "
                              "Conv1D), as peft; target nn.Linear layers")

