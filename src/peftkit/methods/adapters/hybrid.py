"""Hybrid methods as configs made of other configs: MAM adapter and UniPELT.

A ``HybridConfig`` holds ``parts``: registered method name -> that method's config kwargs (a dict, so the
whole hybrid is saved in one ``adapter_config.json``). Each part chooses its own targets exactly as when used
alone; on every targeted layer one hybrid adapter runs the parts present there, in sorted name order:

    out <- out + g_i (part_i(x, out) - out),    g_i = sigmoid(W_g x_i + b_g) if gated else 1,

W_g (1, d) per part per layer, x_i the part's input (the layer's output for an adapter in sequence, the layer's
input otherwise); a bottleneck adapter's gate scales the adapter's own output inside it (the same formula,
and right where the adapter joins the residual before a LayerNorm: ``original_ln_before``).
``gate_pooling="mean"`` averages g_i over the sequence (one gate per example: UniPELT's code and AdapterHub,
padding included), "token" keeps one per position.

A prompt part (prefix tuning) lives on the input embedding and rewrites the call's inputs through the engine's
prompt hook (``methods.prompt.hook``): the prefix ``P_K, P_V`` of every attention layer goes in through the KV
cache, built once per call. Gated, it gets UniPELT's prefix gate: per attention layer l,
``G_P = mean_seq sigmoid(W_gp x_l + b_gp)`` (one scalar per example, as in AdapterHub; a per-token gate cannot
scale keys that every query shares) from that layer's attention input x_l, and the layer attends over
``[G_P P_K; K], [G_P P_V; V]``. The gate ``Linear(d, 1)`` sits on the layer's query projection (its input is
x_l, and it runs before the attention reads the cache): when the call built a fresh prefix it rewrites the
cache entry of its layer from the ungated prefix, ``G_P P``. Decoding steps reuse the cache, gated by the
prompt's pass.

- MAM adapter (He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning", arXiv
  2110.04366): prefix tuning on attention (l = 30) + scaled parallel adapter on the FFN (m = 512, s = 4).
- UniPELT (Mao et al. 2022, arXiv 2110.07577): bottleneck adapter (reduction 16) + prefix (10) + LoRA
  (r = 8, alpha = 2), each scaled by a learned gate sigmoid(W_g x): one gate per part per wrapped layer (W_q
  and W_v each have their own LoRA gate, as in AdapterHub), one prefix gate per attention layer. Outputs equal
  AdapterHub's UniPELT with its weights copied across (tests/methods/test_adapterhub_parity.py; conventions
  in docs/compatibility.md).

Prefix tuning needs a model with a KV-cache interface (decoders, T5); on others drop the part
(``parts={... without "prefix_tuning"}``) or get_peft_model raises NotApplicableError.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ...config import ConfigError, PeftConfig
from ...layers import Adapter
from ..prompt.hook import PromptAdapter, install, uninstall
from ...registry import get_method, register_method
from ...targeting import Conv1D, NotApplicableError, TargetError, model_family
from .bottleneck import BottleneckAdapter, adapter_factory, block_dims, norm_width
from .hybrid_prefix import PrefixStash, PromptPart, prefix_gate_hosts

# injections in progress, by hybrid config id
_PLAN: dict[int, "_Plan"] = {}


@dataclasses.dataclass
class HybridConfig(PeftConfig):
    """Several methods as one adapter (see the module doc).

    Args:
        parts: registered method name -> its config kwargs (e.g. ``{"lora": {"r": 8}, "pfeiffer": {}}``).
        gated: scale each part by a learned gate ``sigmoid(W_g x)`` (UniPELT); a prefix part's gate scales its
            keys and values per layer.
        gate_pooling: "token" (one gate per position) or "mean" (the positions' mean: one per example, as
            UniPELT's code and AdapterHub). A prefix gate is always the mean.
        modules_to_save: modules trained in full and saved with the adapter.
    """

    PEFT_TYPE: ClassVar[str] = "HYBRID"

    parts: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    gated: bool = False
    gate_pooling: str = "token"
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.parts, dict) or not self.parts:
            raise ConfigError(
                f"{type(self).__name__}.parts: expected {{method name: config kwargs}}, got {self.parts!r}")
        for name, kwargs in self.parts.items():
            if not isinstance(kwargs, dict):
                raise ConfigError(f"{type(self).__name__}.parts[{name!r}]: expected a dict of config kwargs")
            self.part_config(name)  # validates the method name and its kwargs now
        # a copy: injection fills in each part (architecture defaults, paths), never the caller's dicts
        self.parts = {name: dict(kwargs) for name, kwargs in self.parts.items()}
        self._check(isinstance(self.gated, bool), "gated", "True or False")
        self._check(self.gate_pooling in ("token", "mean"), "gate_pooling", '"token" or "mean"')

    def part_config(self, name: str) -> PeftConfig:
        try:
            spec = get_method(name)
        except KeyError:
            raise ConfigError(f"{type(self).__name__}.parts: unknown method {name!r}") from None
        if spec.category in ("hybrid", "selective") or spec.adapter_cls.uses_shared_state:
            raise ConfigError(f"{type(self).__name__}.parts[{name!r}]: a {spec.category} method"
                              f"{' with shared state' if spec.adapter_cls.uses_shared_state else ''} cannot be a part")
        kwargs = {k: v for k, v in self.parts[name].items() if k != "peft_type" and not k.startswith("_")}
        try:
            config = spec.config_cls(**kwargs)
        except TypeError as err:
            raise ConfigError(f"{type(self).__name__}.parts[{name!r}]: {err}") from None
        config.inference_mode = self.inference_mode
        return config


@dataclasses.dataclass
class MamConfig(HybridConfig):
    """MAM adapter: prefix tuning (30 tokens) + scaled parallel adapter on the FFN (m = 512, s = 4)."""

    PEFT_TYPE: ClassVar[str] = "MAM"

    parts: dict[str, dict[str, Any]] = dataclasses.field(default_factory=lambda: {
        "prefix_tuning": {"num_virtual_tokens": 30},
        "parallel_adapter": {"bottleneck_size": 512, "scaling": 4.0}})


@dataclasses.dataclass
class UniPeltConfig(HybridConfig):
    """UniPELT: gated bottleneck adapter (reduction 16) + gated prefix (10 tokens) + gated LoRA (r = 8, alpha = 2
    on q, v); gates averaged over the sequence."""

    PEFT_TYPE: ClassVar[str] = "UNIPELT"

    parts: dict[str, dict[str, Any]] = dataclasses.field(default_factory=lambda: {
        "pfeiffer": {"reduction_factor": 16.0, "init_weights": "lora"},
        "prefix_tuning": {"num_virtual_tokens": 10},
        "lora": {"r": 8, "lora_alpha": 2}})
    gated: bool = True
    gate_pooling: str = "mean"


def _gate_width(part_cfg: PeftConfig, base: nn.Module) -> int:
    """A gate reads the part's input: the layer's output for an adapter in sequence, the layer's input otherwise."""
    if getattr(part_cfg, "original_ln_before", False):
        return norm_width(base)
    d_out, d_in = block_dims(base)
    return d_out if getattr(part_cfg, "mode", None) == "sequential" else d_in


def _gets_gate(name: str, part_cfg: PeftConfig, base: nn.Module, key: str) -> bool:
    """A layer part of a gated hybrid gets a gate where it holds parameters (a split FFN's add piece holds none)."""
    cls = get_method(name).adapter_cls
    return not issubclass(cls, PromptAdapter) and cls.param_count(base, part_cfg, key) > 0


class _Plan:
    """An injection in progress: the part configs, the parts on each path, the prefix gates' hosts (query
    projection path -> attention layer index) and the stash they share with the prefix part."""

    def __init__(self, configs: dict[str, PeftConfig]) -> None:
        self.configs = configs
        self.paths: dict[str, list[str]] = {}
        self.prefix_gates: dict[str, int] = {}
        self.stash = PrefixStash()


class HybridAdapter(Adapter):
    """The parts of a hybrid present on one layer, with their gates (and, on a query projection, the prefix's)."""

    supported_layers = (nn.Module,)

    @classmethod
    def install_model_hooks(cls, model: nn.Module) -> None:
        install(model)  # a prefix part rewrites the call's inputs (idempotent, a no-op without an active prompt)

    @classmethod
    def remove_model_hooks(cls, model: nn.Module) -> None:
        uninstall(model)

    def __new__(cls, *args: Any, **kwargs: Any) -> "HybridAdapter":
        if not args:  # copy / pickle
            return super().__new__(cls)
        config, key = args[1], args[2] if len(args) > 2 else kwargs.get("key", "")
        names = _PLAN[id(config)].paths.get(key, [])
        prompt = any(issubclass(get_method(n).adapter_cls, PromptAdapter) for n in names)
        if not prompt or issubclass(cls, PromptAdapter):
            return super().__new__(cls)
        if cls not in WITH_PROMPT:  # on the input embedding: the class with the prompt mixin
            raise TypeError(f"{cls.__name__} has a prompt part but no prompt class: define "
                            f"class {cls.__name__}WithPrompt({cls.__name__}, PromptPart) and add it to WITH_PROMPT")
        return super().__new__(WITH_PROMPT[cls])

    def __init__(self, base: nn.Module, config: HybridConfig, key: str = "", init: bool = True) -> None:
        super().__init__()
        plan = _PLAN[id(config)]
        names = plan.paths[key]
        self.parts = nn.ModuleDict()
        self.gates = nn.ModuleDict()
        self.pooling = config.gate_pooling
        self.prefix_layer: int | None = None  # on a query projection: the attention layer whose prefix it gates
        self.prefix_gate = ""  # ... and the name of that gate (the prefix part's)
        self.prefix_stash: PrefixStash | None = None
        keys: dict[str, str] = {}
        if len(names) > 1 and any(issubclass(get_method(n).adapter_cls, PromptAdapter) for n in names):
            raise TargetError(f"{key}: a prompt part cannot share its layer with other parts ({names})")
        for name in names:
            part_cfg = plan.configs[name]
            if isinstance(base, Conv1D) and getattr(part_cfg, "fan_in_fan_out", True) is False:
                part_cfg.fan_in_fan_out = True  # as the tuner does for a plain adapter on GPT-2's Conv1D
            part = get_method(name).adapter_cls(base, part_cfg, key, init=init)
            self.parts[name] = part
            if isinstance(part, PromptAdapter):
                self.prefix_stash = plan.stash if config.gated else None
                continue
            keys.update({f"{name}|{p}": f"{name}.{s}" for p, s in part.checkpoint_keys.items()})
            if config.gated and _gets_gate(name, part_cfg, base, key):
                self._add_gate(name, _gate_width(part_cfg, base), base, keys)
        if key in plan.prefix_gates:  # UniPELT's prefix gate G_P = sigmoid(W_gp x) on this attention layer
            prompt = next(n for n, c in plan.configs.items() if issubclass(get_method(n).adapter_cls, PromptAdapter))
            self._add_gate(prompt, block_dims(base)[1], base, keys)
            self.prefix_layer, self.prefix_gate, self.prefix_stash = plan.prefix_gates[key], prompt, plan.stash
        self.checkpoint_keys = keys

    def _add_gate(self, name: str, width: int, base: nn.Module, keys: dict[str, str]) -> None:
        self.gates[name] = nn.Linear(width, 1, **adapter_factory(base))  # W_g (1, d), b_g (1,)
        keys.update({f"{name}|gate.{w}": f"{name}.gate.{w}" for w in ("weight", "bias")})

    def __getattr__(self, name: str) -> Any:
        if "|" in name:  # checkpoint access: "<part>|<its parameter>" or "<part>|gate.weight"
            part, _, param = name.partition("|")
            if param.startswith("gate."):
                return getattr(self.gates[part], param[5:])
            return getattr(self.parts[part], param)
        return super().__getattr__(name)

    @classmethod
    def param_count(cls, base: nn.Module, config: HybridConfig, key: str = "") -> int:
        """The parts' own closed forms on this layer, plus ``d + 1`` per gate (a prefix part's gates: ``d + 1`` on
        each attention layer's query projection)."""
        total = 0
        for name in sorted(config.parts):
            spec, part_cfg = get_method(name), config.part_config(name)
            if config.gated and key in config.parts[name].get("_gate_paths", []):
                total += block_dims(base)[1] + 1
            if key not in config.parts[name].get("_paths", []):
                continue
            total += spec.adapter_cls.param_count(base, part_cfg, key)
            if config.gated and _gets_gate(name, part_cfg, base, key):
                total += _gate_width(part_cfg, base) + 1
        return total

    # -- targeting ---------------------------------------------------------------------------------------
    @classmethod
    def prepare_config(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: HybridConfig) -> None:
        configs = {n: config.part_config(n) for n in sorted(config.parts)}
        for name, part_cfg in configs.items():
            get_method(name).adapter_cls.prepare_config(model, named, part_cfg)
            if getattr(part_cfg, "modules_to_save", None):
                extra = [*(config.modules_to_save or []), *part_cfg.modules_to_save]
                config.modules_to_save = list(dict.fromkeys(extra))
        _PLAN[id(config)] = _Plan(configs)

    @classmethod
    def select_targets(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: HybridConfig) -> list[str]:
        if id(config) not in _PLAN:
            cls.prepare_config(model, named, config)
        plan = _PLAN[id(config)]
        plan.paths.clear()
        plan.prefix_gates = {}
        for name, part_cfg in plan.configs.items():
            spec = get_method(name)
            try:
                paths = spec.adapter_cls.select_targets(model, named, part_cfg)
            except NotApplicableError:
                raise
            except TargetError as err:
                if model_family(model) is None and getattr(part_cfg, "target_modules", None) is None:
                    raise NotApplicableError(f"{type(config).__name__}.parts[{name!r}]: {err}") from None
                raise TargetError(f"{type(config).__name__}.parts[{name!r}]: {err}") from None
            for p in paths:
                plan.paths.setdefault(p, []).append(name)
            # the filled-in part config (architecture defaults, split FFN, owners) is what gets saved
            saved = {k: v for k, v in part_cfg.to_dict().items() if k not in PeftConfig.__dataclass_fields__}
            config.parts[name] = {**saved, "_paths": paths}
            if config.gated and issubclass(spec.adapter_cls, PromptAdapter):
                plan.prefix_gates = prefix_gate_hosts(model, named)
                config.parts[name]["_gate_paths"] = list(plan.prefix_gates)
                for p in plan.prefix_gates:
                    plan.paths.setdefault(p, [])
        order = [p for p, _ in named if p in plan.paths]
        return order

    # -- forward -----------------------------------------------------------------------------------------
    def gate(self, name: str, t: Tensor, pool: bool = False) -> Tensor:
        """``sigmoid(W_g t + b_g)``, (..., 1); averaged over the positions (all but the first and last dims)
        with ``gate_pooling="mean"`` or ``pool``."""
        lin = self.gates[name]
        g = torch.sigmoid(lin(t.to(lin.weight.dtype)))
        if (pool or self.pooling == "mean") and g.dim() > 2:
            g = g.mean(dim=tuple(range(1, g.dim() - 1)), keepdim=True)
        return g

    def gate_prefix(self, x: Tensor) -> None:
        """Gate this attention layer's prefix in the call's cache: ``[G_P P; rest]`` (x: the attention input)."""
        entry = self.prefix_stash.layers.get(self.prefix_layer) if self.prefix_stash is not None else None
        if entry is None:  # no fresh prefix in this call (disabled, or a decoding step)
            return
        layer, keys, values = entry
        g = self.gate(self.prefix_gate, x, pool=True).reshape(-1, 1, 1, 1).to(keys.dtype)  # (batch, 1, 1, 1)
        n = keys.shape[-2]
        # the entry holds the prefix alone, or [prefix; new] when the layer runs again (checkpoint replay)
        layer.keys = torch.cat([keys * g, layer.keys[..., n:, :]], dim=-2)
        layer.values = torch.cat([values * g, layer.values[..., n:, :]], dim=-2)

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        if self.prefix_layer is not None:
            self.gate_prefix(x)
        for name, part in self.parts.items():
            if isinstance(part, PromptAdapter):
                continue
            if name not in self.gates:
                out = part(base, x, out)
            elif isinstance(part, BottleneckAdapter):  # the gate scales the adapter's output inside it
                out = part(base, x, out, gate=self._gate_fn(name))
            else:
                # a gated part gets a copy: an adapter may accumulate into the running output in place (LoRA
                # does when autograd is off), and the gate reads ``out`` again
                new = part(base, x, out.clone())
                src = out if getattr(part, "piece", "") == "seq" else x
                g = self.gate(name, src).to(out.dtype)
                out = out + g * (new - out)
        return out

    def _gate_fn(self, name: str) -> Callable[[Tensor], Tensor]:
        return lambda t: self.gate(name, t)


_META = dict(category="hybrid", modalities=("text", "vision", "vision-language", "generation"), mergeable=False,
             changes_structure=True, starts_at_base=True)

register_method("hybrid", config=HybridConfig,
                param_formula="sum of the parts' closed forms (+ d + 1 per gate; a prefix: per attention layer)",
                position="the parts' positions", paper="peftkit: configs made of other configs", **_META)(HybridAdapter)


class MamAdapter(HybridAdapter):
    """MAM adapter (arXiv 2110.04366)."""


class UniPeltAdapter(HybridAdapter):
    """UniPELT (arXiv 2110.07577)."""


register_method("mam", config=MamConfig, param_formula="prefix n 2 L d + parallel adapter 2dm + m + d per layer",
                position="KV prefix on attention + parallel adapter beside the FFN", paper="arXiv 2110.04366 (MAM)",
                examples={"mam-no-prefix": {"parts": {"parallel_adapter": {"bottleneck_size": 4, "scaling": 4.0}}}},
                **_META)(MamAdapter)
register_method("unipelt", config=UniPeltConfig,
                param_formula="gated adapter + prefix + LoRA (+ d + 1 per gate, prefix gate per attention layer)",
                position="adapter after FFN, KV prefix, LoRA on q / v, each gated", paper="arXiv 2110.07577 (UniPELT)",
                examples={"unipelt-no-prefix": {"parts": {"pfeiffer": {"bottleneck_size": 4, "reduction_factor": None,
                                                                       "init_weights": "lora"}, "lora": {"r": 2}}}},
                **_META)(UniPeltAdapter)



# a hybrid's adapter on the input embedding when it holds a prompt part (HybridAdapter.__new__ picks it)
class HybridAdapterWithPrompt(HybridAdapter, PromptPart):
    """A hybrid's adapter that holds its prompt part (on the input embedding)."""


class MamAdapterWithPrompt(MamAdapter, PromptPart):
    """MAM adapter's adapter that holds its prefix part (on the input embedding)."""


class UniPeltAdapterWithPrompt(UniPeltAdapter, PromptPart):
    """UniPELT's adapter that holds its prefix part (on the input embedding)."""


WITH_PROMPT: dict[type, type] = {HybridAdapter: HybridAdapterWithPrompt, MamAdapter: MamAdapterWithPrompt,
                                 UniPeltAdapter: UniPeltAdapterWithPrompt}
