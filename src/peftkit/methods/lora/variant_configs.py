"""The sub-configs of LoRA's variants and runtime options, with peft 0.21.2's names, fields, defaults and checks:
``KasaConfig`` (``kasa_config``: KaSA, methods/lora/kasa.py), ``VeloraConfig`` (``velora_config``: VeLoRA,
methods/lora/velora.py), ``MontecloraConfig`` (``monteclora_config``: MonteCLoRA, methods/lora/monteclora.py),
``BdLoraConfig`` (``use_bdlora``: BD-LoRA, methods/lora/bdlora.py), ``LoraRuntimeConfig`` (``runtime_config``: options
of this process only, never saved: ``LoraConfig.to_dict`` drops it, as peft). QALoRA (``use_qalora``,
``qalora_group_size``: methods/lora/qalora.py) is two plain fields, checked by ``check_variants``.

``LoraConfig`` keeps them as these dataclasses; a dict (an ``adapter_config.json`` read back) becomes one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any, Literal

from ...config import ConfigError
from .init_configs import subconfig

# peft's LoRA variant fields (``is_lora_variant`` in its LoraConfig): on one layer at most one may be set (peft's
# ``resolve_lora_variant`` accepts no combination); the ones peftkit implements are checked by ``check_variants``
VARIANT_FIELDS = ("use_dora", "alora_invocation_tokens", "kasa_config", "velora_config", "monteclora_config",
                  "use_bdlora", "use_qalora", "arrow_config")


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


def _need(ok: bool, owner: str, name: str, expected: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{owner}.{name}: expected {expected}, got {value!r}")


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_VELORA_INITS = ("batch_average_once", "batch_average", "random")


@dataclasses.dataclass
class VeloraConfig:
    """VeLoRA, memory-efficient training with rank-1 sub-token projections (Miles et al. 2024, arXiv 2405.17991).

    Args:
        num_groups: each input token (d_in features) is split into this many sub-tokens of ``ceil(d_in / num_groups)``
            features (zero-padded), each kept for backward as one number, its projection on a unit vector.
        scale: factor on the reconstructed activations in the backward pass (> 0).
        init_type: the projection vector: "batch_average" (the normalised mean sub-token of each training batch),
            "batch_average_once" (of the first training batch only) or "random" (a random unit vector, fixed).
    """

    num_groups: int = field(default=64, metadata={"help": "Number of feature groups (sub-tokens) per input token"})
    scale: float = field(default=1.0, metadata={"help": "Scale of the reconstructed activations in backward"})
    init_type: Literal["batch_average", "batch_average_once", "random"] = field(
        default="batch_average", metadata={"help": "Projection init: 'batch_average', 'batch_average_once', 'random'"})

    def __post_init__(self) -> None:
        _need(_int(self.num_groups) and self.num_groups > 0, "VeloraConfig", "num_groups", "an integer > 0",
              self.num_groups)
        _need(_number(self.scale) and self.scale > 0, "VeloraConfig", "scale", "a number > 0", self.scale)
        _need(self.init_type in _VELORA_INITS, "VeloraConfig", "init_type",
              "'batch_average_once', 'batch_average' or 'random'", self.init_type)


@dataclasses.dataclass
class MontecloraConfig:
    """MonteCLoRA, Monte-Carlo low-rank adaptation (Sengupta et al. 2024, arXiv 2411.04358).

    Args:
        num_samples: Monte-Carlo samples (perturbed copies of lora_A) mixed per training forward.
        use_entropy: add ``sum(expert_weights ** 2)`` to the variational loss.
        dirichlet_prior: concentration of the Dirichlet prior on the mixture weights (> 0).
        sample_scaler: scale of the Gaussian perturbations of lora_A (>= 0).
        kl_loss_weight: weight of the KL terms in the variational loss (>= 0).
        buffer_size: how many noise draws peft pre-generates per layer (>= 1; kept for the file, see monteclora.py).
    """

    num_samples: int = field(default=8, metadata={"help": "Number of Monte Carlo samples per forward pass"})
    use_entropy: bool = field(default=False, metadata={"help": "Add the entropy regularization term"})
    dirichlet_prior: float = field(default=0.1, metadata={"help": "Dirichlet prior of the expert weights"})
    sample_scaler: float = field(default=1e-4, metadata={"help": "Scale of the Monte Carlo perturbations"})
    kl_loss_weight: float = field(default=1e-5, metadata={"help": "Weight of the KL divergence loss"})
    buffer_size: int = field(default=150, metadata={"help": "Size of the buffer for the Monte Carlo sampler"})

    def __post_init__(self) -> None:
        owner = "MontecloraConfig"
        _need(_int(self.num_samples) and self.num_samples > 0, owner, "num_samples", "an integer > 0",
              self.num_samples)
        _need(isinstance(self.use_entropy, bool), owner, "use_entropy", "True or False", self.use_entropy)
        _need(_number(self.dirichlet_prior) and self.dirichlet_prior > 0, owner, "dirichlet_prior", "a number > 0",
              self.dirichlet_prior)
        for name in ("sample_scaler", "kl_loss_weight"):
            value = getattr(self, name)
            _need(_number(value) and value >= 0, owner, name, "a number >= 0", value)
        _need(_int(self.buffer_size) and self.buffer_size > 0, owner, "buffer_size", "an integer > 0",
              self.buffer_size)


def _patterns(value: Any) -> bool:
    return value is None or (isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(p, str) for p in value))


@dataclasses.dataclass
class BdLoraConfig:
    """BD-LoRA, block-diagonal LoRA for tensor-parallel multi-LoRA serving (Wang et al. 2025, arXiv 2510.23346).

    A target whose name contains a pattern of ``target_modules_bd_a`` gets a block-diagonal lora_A (use it on
    row-sharded layers: attention's output, the MLP's down projection), one of ``target_modules_bd_b`` a
    block-diagonal lora_B (column-sharded layers: q / k / v, up / gate), ``nblocks`` blocks each (the serving
    sharding degree).

    Args:
        target_modules_bd_a / target_modules_bd_b: substrings of module names (``pattern in name``, as peft).
        nblocks: number of diagonal blocks (>= 1); it must divide the factor's dimensions (checked per layer).
        match_strict: every target must match one of the two lists (False: unmatched targets get plain LoRA).
    """

    target_modules_bd_a: list[str] | None = field(default=None, metadata={"help": "Modules with block-diagonal A"})
    target_modules_bd_b: list[str] | None = field(default=None, metadata={"help": "Modules with block-diagonal B"})
    nblocks: int = field(default=1, metadata={"help": "Number of blocks of each block-diagonal factor"})
    match_strict: bool = field(default=True, metadata={"help": "Every target must match bd_a or bd_b"})

    def __post_init__(self) -> None:
        owner = "BdLoraConfig"
        for name in ("target_modules_bd_a", "target_modules_bd_b"):
            value = getattr(self, name)
            _need(_patterns(value), owner, name, "a list of module-name patterns (e.g. ['q_proj', 'v_proj']) or None",
                  value)
            if value is not None:
                setattr(self, name, sorted(value) if isinstance(value, (set, frozenset)) else list(value))
        _need(_int(self.nblocks) and self.nblocks > 0, owner, "nblocks", "an integer > 0", self.nblocks)
        _need(isinstance(self.match_strict, bool), owner, "match_strict", "True or False", self.match_strict)
        overlap = sorted(set(self.target_modules_bd_a or []) & set(self.target_modules_bd_b or []))
        if overlap:
            raise ConfigError(f"BdLoraConfig.target_modules_bd_a / target_modules_bd_b: a pattern may be in one list "
                              f"only (a factor is block-diagonal in A or in B); both hold {overlap}")


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
    config.velora_config = subconfig(config.velora_config, VeloraConfig, "velora_config")
    config.monteclora_config = subconfig(config.monteclora_config, MontecloraConfig, "monteclora_config")
    config.use_bdlora = subconfig(config.use_bdlora, BdLoraConfig, "use_bdlora")
    _check_qalora_fields(config)
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
    for name, what in (("use_bdlora", "BD-LoRA"), ("use_qalora", "QALoRA")):
        if getattr(config, name) not in (None, False):
            _check_factor_variant(config, name, what)
    for name, what in (("velora_config", "VeLoRA"), ("monteclora_config", "MonteCLoRA")):
        if getattr(config, name) is not None and config.target_parameters:
            raise ConfigError(f"LoraConfig.{name}: {what} adapts Linear layers only, not target_parameters (peft "
                              f"refuses it too); got target_parameters={config.target_parameters!r}")
    if config.kasa_config is not None:
        if config.target_parameters:
            raise ConfigError("LoraConfig.kasa_config: KaSA adapts nn.Linear layers only, not target_parameters "
                              f"(peft refuses it too); got target_parameters={config.target_parameters!r}")
        if config.fan_in_fan_out:
            raise ConfigError("LoraConfig.kasa_config: KaSA does not support fan_in_fan_out=True (e.g. GPT-2's "
                              "Conv1D), as peft; target nn.Linear layers")


def _check_qalora_fields(config: Any) -> None:
    _need(isinstance(config.use_qalora, bool), "LoraConfig", "use_qalora", "True or False", config.use_qalora)
    size = config.qalora_group_size
    _need(_int(size) and size > 0, "LoraConfig", "qalora_group_size", "an integer > 0 (it must divide the targets' "
          "in_features)", size)


def _check_factor_variant(config: Any, name: str, what: str) -> None:
    """BD-LoRA / QALoRA replace a LoRA factor of an nn.Linear by another shape: what they cannot take beside it."""
    init = config.init_lora_weights
    if not (isinstance(init, bool) or init == "gaussian"):
        raise ConfigError(f"LoraConfig.{name}: {what} takes init_lora_weights True, False or 'gaussian' (its "
                          f"reshaped factor gets its own init, so a weight-derived init would not hold); got {init!r}")
    for other, bad in (("lora_bias", config.lora_bias), ("fan_in_fan_out", config.fan_in_fan_out),
                       ("target_parameters", config.target_parameters)):
        if bad:
            raise ConfigError(f"LoraConfig.{name}: {what} adapts nn.Linear layers without a LoRA bias; it cannot be "
                              f"combined with {other}={bad!r}")
