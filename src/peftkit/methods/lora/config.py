"""LoraConfig: field names and defaults as in Hugging Face PEFT, validated when built."""

from __future__ import annotations

import dataclasses
import re
import warnings
from dataclasses import field
from typing import Any, ClassVar

from ...config import (
    ConfigError, PeftConfig, check_bool, check_int, check_number, check_pattern, check_probability, is_int,
)

from ..trainable_tokens.config import check_token_indices
from .dispatch import register_custom_module
from .replication import check_layer_map
from .init_configs import CordaConfig, EvaConfig, LoraGAConfig, subconfig
from .variant_configs import LoraRuntimeConfig, check_variants
from .arrow_config import check_arrow

# "orthogonal", "eva", "corda", "lora_ga": data-driven and random-orthogonal inits (methods/lora/data_init.py)
_INIT_NAMES = ("gaussian", "pissa", "olora", "loftq", "orthogonal", "eva", "corda", "lora_ga")
_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")

# Hugging Face PEFT fields that peftkit reads (so its configs load without warnings) but does not
# implement. Any value other than the default is rejected with a clear error instead of being ignored.
_UNSUPPORTED_DEFAULTS: dict[str, Any] = {
    "megatron_config": None, "megatron_core": "megatron.core",
}
# fields where an empty list means the same as the default
_EMPTY_IS_DEFAULT: tuple[str, ...] = ()


@dataclasses.dataclass
class LoraConfig(PeftConfig):
    """LoRA (Hu et al. 2021, arXiv 2106.09685) and its variants.

    Args:
        r: rank of the update ``B A``.
        target_modules: module names (exact or dotted suffix), a full-match regex, or ``"all-linear"``.
            None picks the architecture's default (query and value projections).
        exclude_modules: names or regex never to target.
        lora_alpha: scale numerator: ``s = lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``).
        lora_dropout: dropout on the adapter's input, in [0, 1).
        fan_in_fan_out: the base weight is stored (in, out), as GPT-2's Conv1D (set automatically).
        bias: which base biases train and are saved with the adapter: "none", "all" or "lora_only".
        use_rslora: rank-stabilised scaling ``alpha / sqrt(r)`` (Kalajdzievski 2023).
        modules_to_save: modules trained in full and saved with the adapter (e.g. a classifier head).
        init_lora_weights: True (Kaiming A, zero B), False (both random: not the identity),
            "gaussian", "pissa", "pissa_niter_N" (randomised SVD, N iterations), "olora", "loftq",
            "orthogonal" (A and B from one random orthogonal matrix; r even), or a data-driven one: "eva"
            (then ``initialize_lora_eva_weights``), "corda" (after ``preprocess_corda``), "lora_ga" (after
            ``preprocess_loraga``).
        eva_config / corda_config / lora_ga_config: their options (``EvaConfig``, ``CordaConfig``,
            ``LoraGAConfig``; ``lora_ga`` requires ``lora_ga_config``).
        loftq_config: LoftQ's options with ``init_lora_weights="loftq"`` (Li et al. 2023, arXiv 2310.08659):
            ``{"loftq_bits": 4 or 8, "loftq_iter": N}`` (default 4 bits, 1 iteration). The base weight
            becomes the quantized Q; quantize the model afterwards (``peftkit.quant.quantize_model``).
        layers_to_transform / layers_pattern: keep only these layer indices.
        rank_pattern / alpha_pattern: per-module overrides of r / lora_alpha, keyed by regex.
        use_dora: weight-decomposed LoRA (Liu et al. 2024, arXiv 2402.09353).
        alora_invocation_tokens: activated LoRA (aLoRA): token ids of the invocation sequence; the adapter acts
            only from its last occurrence in each row on, in forward and ``generate`` (methods/lora/alora.py).
        kasa_config: KaSA (``KasaConfig``; Wang et al. 2024, arXiv 2412.06071): the base weight loses its r smallest
            singular components, the update is ``s B diag(lora_diag) A`` (methods/lora/kasa.py); Linear only.
        velora_config: VeLoRA (``VeloraConfig``; Miles et al. 2024, arXiv 2405.17991): lora_A keeps rank-1 sub-token
            projections of its input for backward instead of the input (methods/lora/velora.py); Linear only.
        monteclora_config: MonteCLoRA (``MontecloraConfig``; Sengupta et al. 2024, arXiv 2411.04358): in training lora_A
            is a learned mixture of Gaussian-perturbed copies, at eval A itself; ``monteclora_loss(model)`` is its
            variational loss (methods/lora/monteclora.py); Linear only.
        use_bdlora: BD-LoRA (``BdLoraConfig``; Wang et al. 2025, arXiv 2510.23346): block-diagonal lora_A or lora_B on
            the targets its patterns name, for tensor-parallel serving (methods/lora/bdlora.py); nn.Linear only.
        use_qalora / qalora_group_size: QALoRA (Xu et al. 2023, arXiv 2309.14717): lora_A acts on the input averaged
            over groups of ``qalora_group_size`` features (methods/lora/qalora.py); nn.Linear and bitsandbytes bases.
        arrow_config: Arrow (``ArrowConfig``; Ostapenko et al. 2024, arXiv 2405.11157): the router over LoRA experts
            that ``create_arrow_model`` adds, optionally with GenKnowSub (methods/lora/arrow.py); Linear only.
        ensure_weight_tying: on a model with ``tie_word_embeddings``, the layers tied to the input embedding (the
            LM head) share its adapter: its trained copy (``modules_to_save``) or its LoRA factors (``target_modules``),
            peft's config rewrite included (methods/lora/tying.py, tied.py).
        runtime_config: ``LoraRuntimeConfig``, options of this process only (not saved).
        target_parameters: names (or dotted suffixes) of ``nn.Parameter``s to adapt directly, e.g. a
            mixture-of-experts model's stacked experts ``["experts.gate_up_proj", "experts.down_proj"]``: one
            low-rank delta per expert, as peft's ``ParamWrapper`` (methods/lora/params.py).
    """

    PEFT_TYPE: ClassVar[str] = "LORA"

    r: int = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_dora: bool = False
    # accepted for file compatibility with Hugging Face PEFT; only the defaults are supported
    megatron_config: dict | None = None
    megatron_core: str | None = "megatron.core"
    trainable_token_indices: Any = None
    loftq_config: dict = field(default_factory=dict)
    eva_config: Any = None
    corda_config: Any = None
    lora_ga_config: Any = None
    velora_config: Any = None
    alora_invocation_tokens: Any = None
    use_qalora: bool = False
    qalora_group_size: int = 16
    monteclora_config: Any = None
    layer_replication: Any = None
    runtime_config: Any = field(default_factory=LoraRuntimeConfig)  # never saved: to_dict drops it (as peft)
    target_parameters: Any = None
    use_bdlora: Any = None
    arrow_config: Any = None
    kasa_config: Any = None
    lora_bias: bool = False
    ensure_weight_tying: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check = self._check
        check_int(self, "r", 1)
        check_number(self, "lora_alpha", above=0)
        check_probability(self, "lora_dropout")
        check(self.bias in ("none", "all", "lora_only"), "bias", "'none', 'all' or 'lora_only'")
        init = self.init_lora_weights
        check(
            isinstance(init, bool) or init in _INIT_NAMES or bool(_PISSA_NITER.fullmatch(str(init))),
            "init_lora_weights",
            "True, False, 'gaussian', 'pissa', 'pissa_niter_N', 'olora', 'loftq', 'orthogonal', 'eva', 'corda' "
            "or 'lora_ga'",
        )
        self._check_loftq()
        self._check_data_init()
        check_arrow(self)  # arrow_config as an ArrowConfig (arrow_config.py; the router: arrow.py)
        check_variants(self)  # kasa_config, runtime_config; one variant at most (variant_configs.py)
        tp = self.target_parameters  # LoRA on named nn.Parameters (methods/lora/params.py); a list, never a str
        if tp is not None and not (isinstance(tp, (list, tuple, set, frozenset))
                                   and all(isinstance(n, str) for n in tp)):
            raise ConfigError(f"LoraConfig.target_parameters: expected a list of parameter names (e.g. "
                              f"['experts.gate_up_proj', 'experts.down_proj']) or None, got {tp!r}")
        if isinstance(tp, (tuple, set, frozenset)):
            self.target_parameters = sorted(tp)
        check_bool(self, "lora_bias", "ensure_weight_tying")
        if self.ensure_weight_tying:  # peft's attributes (not fields), set when the model is known (tying.py)
            self.modules_to_tie = self.target_modules_to_tie = None
        if self.lora_bias and (self.use_dora or not isinstance(init, bool)):
            raise ConfigError("LoraConfig.lora_bias: only with use_dora=False and init_lora_weights True or False "
                              f"(as in peft); got use_dora={self.use_dora}, init_lora_weights={init!r}")
        check_pattern(self, "rank_pattern", integer=True)
        check_pattern(self, "alpha_pattern", integer=False)
        if self.use_rslora and (self.rank_pattern or self.alpha_pattern) and (
                (isinstance(init, str) and init.startswith("pissa")) or init in ("olora", "corda", "lora_ga")):
            # PEFT's rule and text: a warning (the conversion is only needed if the user asks for it on save)
            warnings.warn(
                "Using Rank-Stabilized LoRA with rank_pattern/alpha_pattern and post-training conversion of modified "
                "base weights PiSSA/CorDA/OLoRA/LoRA-GA means that you won't be able to pass "
                "`path_initial_model_for_weight_conversion` to `save_pretrained` to restore the initial values of "
                "the base weights; if you intend to do this, please ensure not to use rslora or "
                "rank_pattern/alpha_pattern.", stacklevel=3)
        if isinstance(self.target_modules, str) and (self.layers_to_transform is not None or self.layers_pattern):
            raise ConfigError(
                "LoraConfig.layers_to_transform / layers_pattern: cannot be used when target_modules is a regex "
                "string; put the layer filter into the regex"
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("LoraConfig.layers_pattern: only meaningful together with layers_to_transform")
        if self.trainable_token_indices is not None:  # trainable tokens beside LoRA (methods/trainable_tokens)
            check_token_indices("LoraConfig", "trainable_token_indices", self.trainable_token_indices, allow_dict=True)
        if self.layer_replication is not None:  # repeated layers with shared weights (replication.py)
            check_layer_map(self.layer_replication)
        if self.alora_invocation_tokens is not None:  # activated LoRA (methods/lora/alora.py)
            self._check_alora()
        for name, default in _UNSUPPORTED_DEFAULTS.items():
            value = getattr(self, name)
            if value != default and not (default == {} and value is None) and not (
                    name in _EMPTY_IS_DEFAULT and isinstance(value, (list, tuple)) and not value):
                allowed = f"{default!r} or []" if name in _EMPTY_IS_DEFAULT else repr(default)
                raise ConfigError(f"LoraConfig.{name}={value!r} is not supported by peftkit (only {allowed})")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("runtime_config", None)  # runtime settings are never saved (peft)
        return out

    _custom_modules = None  # {layer type: adapter class}, peft's attribute (not a field: never saved)

    def _register_custom_module(self, mapping: dict[type, type]) -> None:
        """peft's experimental API for layer types LoRA does not know: ``{LayerType: AdapterClass}``, where in
        peftkit ``AdapterClass`` is an ``Adapter`` subclass (usually of ``LoraAdapter``; see
        ``methods/lora/dispatch.py`` and docs/compatibility.md, 'Custom layer types')."""
        register_custom_module(self, mapping)

    def _check_loftq(self) -> None:
        cfg = self.loftq_config or {}
        if not isinstance(cfg, dict):
            raise ConfigError(f"LoraConfig.loftq_config: expected a dict, got {cfg!r}")
        if cfg and self.init_lora_weights != "loftq":
            raise ConfigError("LoraConfig.loftq_config: only used with init_lora_weights='loftq'")
        unknown = set(cfg) - {"loftq_bits", "loftq_iter"}
        if unknown:
            raise ConfigError(f"LoraConfig.loftq_config: unknown keys {sorted(unknown)} (loftq_bits, loftq_iter)")
        if cfg.get("loftq_bits", 4) not in (4, 8):
            raise ConfigError(f"LoraConfig.loftq_config['loftq_bits']: expected 4 or 8, got {cfg['loftq_bits']!r}")
        it = cfg.get("loftq_iter", 1)
        if not (is_int(it) and it >= 1):
            raise ConfigError(f"LoraConfig.loftq_config['loftq_iter']: expected an integer >= 1, got {it!r}")

    def _check_alora(self) -> None:
        """aLoRA: a non-empty list of token ids; not with what peft refuses beside it (its variant table)."""
        tokens = self.alora_invocation_tokens
        if not (isinstance(tokens, (list, tuple)) and tokens and all(is_int(t) and t >= 0 for t in tokens)):
            raise ConfigError("LoraConfig.alora_invocation_tokens: expected a non-empty list of token ids "
                              f"(integers >= 0), e.g. tokenizer.encode(invocation_string), or None; got {tokens!r}")
        self.alora_invocation_tokens = list(tokens)
        for name, bad in (("use_dora", self.use_dora), ("target_parameters", self.target_parameters)):
            if bad:
                raise ConfigError(f"LoraConfig.alora_invocation_tokens: aLoRA cannot be combined with {name}="
                                  f"{bad!r} (peft refuses the combination too)")
        task = getattr(self.task_type, "value", self.task_type)
        if task != "CAUSAL_LM":  # peft's warning: only PeftModelForCausalLM finds the invocation by itself
            warnings.warn("aLoRA is currently only supported for CAUSAL_LM task.", stacklevel=4)

    def _check_data_init(self) -> None:
        """The sub-configs of EVA, CorDA and LoRA-GA as dataclasses; peft's defaults and warnings."""
        self.eva_config = subconfig(self.eva_config, EvaConfig, "eva_config")
        self.corda_config = subconfig(self.corda_config, CordaConfig, "corda_config")
        self.lora_ga_config = subconfig(self.lora_ga_config, LoraGAConfig, "lora_ga_config")
        init = self.init_lora_weights
        if init == "eva" and self.eva_config is None:
            warnings.warn("`init_lora_weights` is 'eva' but `eva_config` is not specified. Using default EVA config.",
                          stacklevel=4)
            self.eva_config = EvaConfig()
        elif init != "eva" and self.eva_config is not None:
            warnings.warn("`eva_config` specified but will be ignored when `init_lora_weights` is not 'eva'.",
                          stacklevel=4)
        elif init == "corda" and self.corda_config is None:
            warnings.warn("`init_lora_weights` is 'corda' but `corda_config` is not specified. Using default CorDA "
                          "config.", stacklevel=4)
            self.corda_config = CordaConfig()
        elif init != "corda" and self.corda_config is not None:
            warnings.warn("`corda_config` specified but will be ignored when `init_lora_weights` is not 'corda'.",
                          stacklevel=4)

    @property
    def loftq_options(self) -> dict[str, int]:
        cfg = self.loftq_config or {}
        return {"bits": cfg.get("loftq_bits", 4), "iters": cfg.get("loftq_iter", 1)}

    @property
    def pissa_niter(self) -> int | None:
        m = _PISSA_NITER.fullmatch(str(self.init_lora_weights))
        return int(m.group(1)) if m else None
