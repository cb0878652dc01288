"""Hybrid methods as configs made of other configs: MAM adapter and UniPELT.

A ``HybridConfig`` holds ``parts``: registered method name -> that method's config kwargs (a dict, so the
whole hybrid is saved in one ``adapter_config.json``). Each part chooses its own targets exactly as when used
alone; on every targeted layer one hybrid adapter runs the parts present there, in sorted name order:

    out <- out + g_i (part_i(x, out) - out),    g_i = sigmoid(W_g x_i + b_g) if gated else 1,

W_g (1, d) per part per layer, x_i the part's input (the layer's output for an adapter in sequence, the layer's
input otherwise). A prompt part (prefix tuning) lives on the input embedding and rewrites the call's inputs
through the engine's prompt hook (``peftkit.prompting``); it is not gated (UniPELT's prefix gate sits inside
the attention softmax, which the KV-cache route does not reach).

- MAM adapter (He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning", arXiv
  2110.04366): prefix tuning on attention (l = 30) + scaled parallel adapter on the FFN (m = 512, s = 4).
- UniPELT (Mao et al. 2022, arXiv 2110.07577): bottleneck adapter (reduction 16) + prefix (10) + LoRA
  (r = 8, alpha = 2), each scaled by a learned gate sigmoid(W_g x). Here one gate per part per wrapped layer
  (UniPELT shares one LoRA gate between W_q and W_v of a layer).

Prefix tuning needs a model with a KV-cache interface (decoders, T5); on others drop the part
(``parts={... without "prefix_tuning"}``) or get_peft_model raises NotApplicableError.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ...config import ConfigError, PeftConfig
from ...layers import Adapter
from ...prompting import PromptAdapter
from ...registry import get_method, register_method
from ...targeting import Conv1D, NotApplicableError, TargetError, model_family
from .bottleneck import adapter_factory, block_dims

# part configs of an injection in progress, by hybrid config id: (part name -> config, path -> part names)
_PLAN: dict[int, tuple[dict[str, PeftConfig], dict[str, list[str]]]] = {}


@dataclasses.dataclass
class HybridConfig(PeftConfig):
    """Several methods as one adapter (see the module doc).

    Args:
        parts: registered method name -> its config kwargs (e.g. ``{"lora": {"r": 8}, "pfeiffer": {}}``).
        gated: scale each layer part by a learned gate ``sigmoid(W_g x)`` (UniPELT).
        modules_to_save: modules trained in full and saved with the adapter.
    """

    PEFT_TYPE: ClassVar[str] = "HYBRID"

    parts: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    gated: bool = False
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.parts, dict) or not self.parts:
            raise ConfigError(
                f"{type(self).__name__}.parts: expected {{method name: config kwargs}}, got {self.parts!r}")
        for name, kwargs in self.parts.items():
            self.part_config(name)  # validates the method name and its kwargs now
            if not isinstance(kwargs, dict):
                raise ConfigError(f"{type(self).__name__}.parts[{name!r}]: expected a dict of config kwargs")
        self._check(isinstance(self.gated, bool), "gated", "True or False")

    def part_config(self, name: str) -> PeftConfig:
        try:
            spec = get_method(name)
        except KeyError:
            raise ConfigError(f"{type(self).__name__}.parts: unknown method {name!r}") from None
        if spec.category in ("hybrid", "selective") or spec.adapter_cls.uses_shared_state:
            raise ConfigError(f"{type(self).__name__}.parts[{name!r}]: a {spec.category} method"
                              f"{' with shared state' if spec.adapter_cls.uses_shared_state else ''} cannot be a part")
        kwargs = {k: v for k, v in self.parts[name].items() if k not in ("peft_type", "_paths")}
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
    """UniPELT: gated bottleneck adapter (reduction 16) + prefix (10 tokens) + LoRA (r = 8, alpha = 2 on q, v)."""

    PEFT_TYPE: ClassVar[str] = "UNIPELT"

    parts: dict[str, dict[str, Any]] = dataclasses.field(default_factory=lambda: {
        "pfeiffer": {"reduction_factor": 16.0, "init_weights": "lora"},
        "prefix_tuning": {"num_virtual_tokens": 10},
        "lora": {"r": 8, "lora_alpha": 2}})
    gated: bool = True


def _gate_width(part_cfg: PeftConfig, base: nn.Module) -> int:
    """A gate reads the part's input: the layer's output for an adapter in sequence, the layer's input otherwise."""
    d_out, d_in = block_dims(base)
    return d_out if getattr(part_cfg, "mode", None) == "sequential" else d_in


class HybridAdapter(Adapter):
    """The parts of a hybrid present on one layer, with their gates."""

    supported_layers = (nn.Module,)
    rewrites_inputs: ClassVar[bool] = True  # a prefix part rewrites the call's inputs (engine hook, idempotent)

    def __new__(cls, *args: Any, **kwargs: Any) -> "HybridAdapter":
        if not args:  # copy / pickle
            return super().__new__(cls)
        config, key = args[1], args[2] if len(args) > 2 else kwargs.get("key", "")
        names = _PLAN[id(config)][1].get(key, [])
        prompt = any(issubclass(get_method(n).adapter_cls, PromptAdapter) for n in names)
        return super().__new__(_with_prompt(cls) if prompt and not issubclass(cls, PromptAdapter) else cls)

    def __init__(self, base: nn.Module, config: HybridConfig, key: str = "", init: bool = True) -> None:
        super().__init__()
        configs, plan = _PLAN[id(config)]
        self.parts = nn.ModuleDict()
        self.gates = nn.ModuleDict()
        keys: dict[str, str] = {}
        if len(plan[key]) > 1 and any(issubclass(get_method(n).adapter_cls, PromptAdapter) for n in plan[key]):
            raise TargetError(f"{key}: a prompt part cannot share its layer with other parts ({plan[key]})")
        for name in plan[key]:
            part_cfg = configs[name]
            if isinstance(base, Conv1D) and getattr(part_cfg, "fan_in_fan_out", True) is False:
                part_cfg.fan_in_fan_out = True  # as the tuner does for a plain adapter on GPT-2's Conv1D
            part = get_method(name).adapter_cls(base, part_cfg, key, init=init)
            self.parts[name] = part
            if not isinstance(part, PromptAdapter):
                keys.update({f"{name}|{p}": f"{name}.{s}" for p, s in part.checkpoint_keys.items()})
                if config.gated:
                    self.gates[name] = nn.Linear(_gate_width(part_cfg, base), 1, **adapter_factory(base))
                    keys.update({f"{name}|gate.{w}": f"{name}.gate.{w}" for w in ("weight", "bias")})
        self.checkpoint_keys = keys

    def __getattr__(self, name: str) -> Any:
        if "|" in name:  # checkpoint access: "<part>|<its parameter>" or "<part>|gate.weight"
            part, _, param = name.partition("|")
            if param.startswith("gate."):
                return getattr(self.gates[part], param[5:])
            return getattr(self.parts[part], param)
        return super().__getattr__(name)

    @classmethod
    def param_count(cls, base: nn.Module, config: HybridConfig, key: str = "") -> int:
        """The parts' own closed forms on this layer, plus ``d + 1`` per gate."""
        total = 0
        for name in sorted(config.parts):
            spec, part_cfg = get_method(name), config.part_config(name)
            if key not in config.parts[name].get("_paths", []):
                continue
            total += spec.adapter_cls.param_count(base, part_cfg, key)
            if config.gated and not issubclass(spec.adapter_cls, PromptAdapter):
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
        _PLAN[id(config)] = (configs, {})

    @classmethod
    def select_targets(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: HybridConfig) -> list[str]:
        if id(config) not in _PLAN:
            cls.prepare_config(model, named, config)
        configs, plan = _PLAN[id(config)]
        plan.clear()
        for name, part_cfg in configs.items():
            try:
                paths = get_method(name).adapter_cls.select_targets(model, named, part_cfg)
            except NotApplicableError:
                raise
            except TargetError as err:
                if model_family(model) is None and getattr(part_cfg, "target_modules", None) is None:
                    raise NotApplicableError(f"{type(config).__name__}.parts[{name!r}]: {err}") from None
                raise TargetError(f"{type(config).__name__}.parts[{name!r}]: {err}") from None
            for p in paths:
                plan.setdefault(p, []).append(name)
            # the filled-in part config (architecture defaults, split FFN, owners) is what gets saved
            saved = {k: v for k, v in part_cfg.to_dict().items() if k not in PeftConfig.__dataclass_fields__}
            config.parts[name] = {**saved, "_paths": paths}
        order = [p for p, _ in named if p in plan]
        return order

    # -- forward -----------------------------------------------------------------------------------------
    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        for name, part in self.parts.items():
            if isinstance(part, PromptAdapter):
                continue
            # a gated part gets a copy: an adapter may accumulate into the running output in place (LoRA
            # does when autograd is off), and the gate reads ``out`` again
            new = part(base, x, out.clone() if name in self.gates else out)
            if name in self.gates:
                src = out if getattr(part, "piece", "") == "seq" else x
                g = torch.sigmoid(self.gates[name](src.to(self.gates[name].weight.dtype))).to(out.dtype)
                new = out + g * (new - out)
            out = new
        return out


class _PromptPart(PromptAdapter):
    """Mixed into a hybrid's adapter on the input embedding when it has a prompt part, so that the engine's
    prompt hook (``peftkit.prompting.active_prompt``) finds it and the checkpoint reads its file tensors."""

    def _prompt(self) -> PromptAdapter:
        return next(p for p in self.parts.values() if isinstance(p, PromptAdapter))

    def rewrite(self, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        return self._prompt().rewrite(model, kwargs)

    def file_tensors(self, for_save: bool) -> dict[str, Tensor]:
        name = next(n for n, p in self.parts.items() if isinstance(p, PromptAdapter))
        return {f"{name}.{k}": v for k, v in self._prompt().file_tensors(for_save).items()}

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        return HybridAdapter.forward(self, base, x, out)  # type: ignore[arg-type]


_PROMPT_CLASSES: dict[type, type] = {}


def _with_prompt(cls: type) -> type:
    """``cls`` with the prompt mixin (one class per hybrid adapter class)."""
    if cls not in _PROMPT_CLASSES:
        _PROMPT_CLASSES[cls] = type(f"{cls.__name__}WithPrompt", (_PromptPart, cls),
                                    {"__module__": __name__, "__doc__": cls.__doc__})
    return _PROMPT_CLASSES[cls]


_META = dict(category="hybrid", modalities=("text", "vision", "vision-language", "generation"), mergeable=False,
             changes_structure=True, starts_at_base=True)

register_method("hybrid", config=HybridConfig, param_formula="sum of the parts' closed forms (+ d + 1 per gate)",
                position="the parts' positions", paper="peftkit: configs made of other configs", **_META)(HybridAdapter)


class MamAdapter(HybridAdapter):
    """MAM adapter (arXiv 2110.04366)."""


class UniPeltAdapter(HybridAdapter):
    """UniPELT (arXiv 2110.07577)."""


register_method("mam", config=MamConfig, param_formula="prefix n 2 L d + parallel adapter 2dm + m + d per layer",
                position="KV prefix on attention + parallel adapter beside the FFN", paper="arXiv 2110.04366 (MAM)",
                examples={"mam-no-prefix": {"parts": {"parallel_adapter": {"bottleneck_size": 4, "scaling": 4.0}}}},
                **_META)(MamAdapter)
register_method("unipelt", config=UniPeltConfig, param_formula="gated adapter + prefix + LoRA (+ d + 1 per gate)",
                position="adapter after FFN, KV prefix, LoRA on q / v, each gated", paper="arXiv 2110.07577 (UniPELT)",
                examples={"unipelt-no-prefix": {"parts": {"pfeiffer": {"bottleneck_size": 4, "reduction_factor": None,
                                                                       "init_weights": "lora"}, "lora": {"r": 2}}}},
                **_META)(UniPeltAdapter)

