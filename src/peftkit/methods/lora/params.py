"""LoRA on named parameters (``LoraConfig.target_parameters``), as peft 0.21.2's ``lora.ParamWrapper``.

Mixture-of-experts models keep their experts as stacked ``nn.Parameter``s, not ``nn.Linear`` modules
(transformers 5: ``MixtralExperts.gate_up_proj`` (E, 2 I, H), ``down_proj`` (E, H, I)); a name in
``target_parameters`` (the parameter's dotted path, or a dotted suffix of it) puts LoRA on such a tensor:

- a 3-D stack (E, d_out, d_in) (or (E, d_in, d_out) when its module says ``is_transposed``) gets one
  low-rank delta per expert, ``W[e] + s B_e A_e``. peft's layout, which the file keeps: ``lora_A`` (r E, d_in)
  holds ``A_e`` in rows ``e r .. e r + r - 1``, ``lora_B`` (d_out, r E) holds ``B_e`` in columns ``k E + e``;
- a 2-D matrix (d_out, d_in) (a router's weight) gets ``W + s B A``, ``lora_A`` (r, d_in), ``lora_B`` (d_out, r).

:class:`ParamLayer` (an ``AdapterLayer``) wraps the module that holds the parameter and, on each call, runs it
with the parameter replaced by its adapted value, formed once per call (for one adapter on a stack, one
``baddbmm``, as peft), so every read inside the module's forward sees it and autograd reaches the factors.
peft does this with ``torch.nn.utils.parametrize`` on every call (a new module class each time); the result
is the same tensor. Several parameters of one module nest, as peft's wrappers do, in the order the module
registers them: the first one innermost, so the file keys are peft's (``experts.base_layer.lora_A.weight`` for
Mixtral's ``gate_up_proj``, ``experts.lora_A.weight`` for its ``down_proj``). Merge, bit-exact unmerge (the
wrapper's restore record), disable, delete and unload are the ``AdapterLayer``'s own.

As peft: no dropout, DoRA, LoRA bias, ``fan_in_fan_out`` or initialisation from the weight there; every
adapter of a model that uses ``target_parameters`` targets the same parameters. peftkit refuses, before the
model changes, a name that matches no parameter and a parameter LoRA cannot factor (not 2-D / 3-D, not float).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ...adapter import Adapter
from ...kernel_helpers import adapter_dtype
from ...layers import AdapterLayer
from ...saved_modules import ModulesToSaveWrapper
from ...targeting import TargetError, is_target, pattern_value, resolve_targets

FIELD = "LoraConfig.target_parameters"


def _names(config: Any) -> list[str]:
    return sorted(set(getattr(config, "target_parameters", None) or ()))


# -- the adapter: the math of one parameter's LoRA ------------------------------------------------------------
class ParamLoraAdapter(Adapter):
    """LoRA on one named parameter of its layer's module (see the module doc for the layout)."""

    checkpoint_keys = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}

    def __init__(self, param: Tensor, parameter_name: str, config: Any, key: str, transposed: bool = False,
                 init: bool = True) -> None:
        super().__init__()
        self.parameter_name, self.key = parameter_name, key
        self.merged_params = (parameter_name,)
        shape = tuple(param.shape)
        if len(shape) == 3:  # peft: (E, d_out, d_in), or (E, d_in, d_out) when the module says is_transposed
            self.num_experts = shape[0]
            d_out, d_in = (shape[2], shape[1]) if transposed else (shape[1], shape[2])
        else:
            self.num_experts, (d_out, d_in) = 1, shape
        self.transposed = transposed and len(shape) == 3
        self.ndim = len(shape)
        self.r = r = pattern_value(config.rank_pattern, key, config.r)
        self.lora_alpha = alpha = pattern_value(config.alpha_pattern, key, config.lora_alpha)
        self.unit_scaling = self.scaling = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        factory = {"device": param.device, "dtype": adapter_dtype(param)}
        self.lora_A = nn.Parameter(torch.empty(r * self.num_experts, d_in, **factory))
        self.lora_B = nn.Parameter(torch.empty(d_out, r * self.num_experts, **factory))
        self.dropout = None
        if init:
            self._init_weights(config.init_lora_weights)

    @torch.no_grad()
    def _init_weights(self, init: Any) -> None:
        # peft: True -> Kaiming A, zero B; "gaussian" -> normal A (std 1 / r), zero B; False -> nn.Linear's init
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if init is False:
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.lora_B)

    @classmethod
    def param_count(cls, base: Any, config: Any, key: str = "") -> int:
        """r E (d_in + d_out) for a parameter of shape (E, ., .); r (d_in + d_out) for a matrix."""
        shape = tuple(base.shape)
        experts = shape[0] if len(shape) == 3 else 1
        return pattern_value(config.rank_pattern, key, config.r) * experts * sum(shape[-2:])

    # -- weights ---------------------------------------------------------------------------------------------
    def factors(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(lhs, rhs), each (E, ., .), with ``delta = s lhs @ rhs`` in the parameter's layout (peft's
        ``get_delta_factors``)."""
        E = self.num_experts
        A = self.lora_A.reshape(E, -1, self.lora_A.shape[-1])  # (E, r, d_in)
        B = self.lora_B.reshape(self.lora_B.shape[0], -1, E).permute(2, 0, 1)  # (E, d_out, r)
        lhs, rhs = (A.transpose(-2, -1), B.transpose(-2, -1)) if self.transposed else (B, A)
        return lhs.to(dtype), rhs.to(dtype)

    def delta(self, dtype: torch.dtype) -> Tensor:
        """``s B A`` in the parameter's shape and ``dtype``."""
        if self.ndim == 2:
            return ((self.lora_B @ self.lora_A) * self.scaling).to(dtype)
        lhs, rhs = self.factors(self.lora_A.dtype)
        return (torch.bmm(lhs, rhs) * self.scaling).to(dtype)

    def applied(self, value: Tensor) -> Tensor:
        """``value + s B A``, out of place, differentiable in the factors (one ``baddbmm`` on a stack, as peft)."""
        if self.ndim == 3 and self.num_experts > 1 and value.dtype in (torch.float32, torch.float16, torch.bfloat16,
                                                                        torch.float64):
            lhs, rhs = self.factors(value.dtype)
            with torch.autocast(device_type=value.device.type, enabled=False):
                return torch.baddbmm(value, lhs, rhs, alpha=self.scaling)
        return value + self.delta(value.dtype)

    def delta_weight(self, base: nn.Module) -> Tensor:
        return self.delta(self.lora_A.dtype)

    def merge(self, base: nn.Module, weight: Tensor) -> tuple[Tensor, Any]:
        return self.merge_param(base, self.parameter_name, weight), None

    def unmerge(self, base: nn.Module, weight: Tensor, state: Any) -> Tensor:
        return self.unmerge_param(base, self.parameter_name, weight)

    def merge_param(self, base: nn.Module, name: str, value: Tensor) -> Tensor:
        return value + self.delta(value.dtype)

    def unmerge_param(self, base: nn.Module, name: str, value: Tensor) -> Tensor:
        return value - self.delta(value.dtype)

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:  # pragma: no cover - never called
        raise RuntimeError("ParamLoraAdapter acts through ParamLayer (the module's parameter), not on an output")


# -- the wrapper: runs the module with its parameter adapted ----------------------------------------------------
class ParamLayer(AdapterLayer):
    """The wrapper of a module one of whose parameters carries LoRA (``parameter_name``); its base is the module,
    or the wrapper of another of the module's parameters (nested, as peft's ``ParamWrapper``)."""

    def __init__(self, base_layer: nn.Module, parameter_name: str) -> None:
        super().__init__(base_layer)
        self.parameter_name = parameter_name

    def owner(self) -> nn.Module:
        """The module that holds the parameter."""
        module = self.base_layer
        while isinstance(module, ParamLayer):
            module = module.base_layer
        return module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.disable_adapters:
            if self.merged_adapters:
                self.unmerge()
            return self.base_layer(*args, **kwargs)
        acting = self._acting()
        if not acting:
            return self.base_layer(*args, **kwargs)
        owner, name = self.owner(), self.parameter_name
        original = owner._parameters[name]
        value = original
        if len(acting) == 1:
            value = self.adapters[acting[0]].applied(original)
        else:  # peft: the sum of the deltas, added once
            delta = None
            for adapter_name in acting:
                d = self.adapters[adapter_name].delta(original.dtype)
                delta = d if delta is None else delta + d
            value = original + delta
        # the module reads its parameter as an attribute: for this call it reads the adapted value (formed once)
        owner._parameters[name] = value
        try:
            return self.base_layer(*args, **kwargs)
        finally:
            owner._parameters[name] = original

    def _acting(self) -> list[str]:
        routing = self.routing
        if routing is None:
            return [n for n in self.active_adapters if n not in self.merged_adapters]
        names = set(routing)
        if len(names) > 1:
            raise ValueError(f"adapter_names: LoRA on the parameter {self.parameter_name!r} (target_parameters) acts "
                             "through the parameter, one for the whole batch, so its rows cannot use different "
                             f"adapters (got {sorted(names)}); run each adapter's rows as a separate batch")
        return [n for n in names if n in self.adapters]

    def extra_repr(self) -> str:
        return f"parameter_name={self.parameter_name!r}, {super().extra_repr()}"


# -- targeting ------------------------------------------------------------------------------------------------
def selects_modules(model: nn.Module, named: list[tuple[str, nn.Module]], config: Any, default_roles: Any,
                    supported: tuple[type, ...]) -> bool:
    """With ``target_parameters`` set: whether ``target_modules`` selects any module (otherwise the adapter is on
    parameters only, as peft: no error; a warning when modules were named and none matched)."""
    targets = getattr(config, "target_modules", None)
    if targets is not None and not targets:
        return False
    try:
        spec = resolve_targets(model, named, config, default_roles, supported)
    except TargetError:  # no default targets for this architecture: parameters only
        return False
    if any(name and is_target(config, name, spec) for name, _ in named):
        return True
    if targets:
        warnings.warn(f"target_modules={targets} were set but no module was matched.", RuntimeWarning, stacklevel=5)
    return False


def _walk(module: nn.Module, path: str, key: str, top: str, chain: list[ParamLayer], out: list, seen: set) -> None:
    """(wrapped path of the outermost ParamLayer or the module, unwrapped key, module, its ParamLayers, blocked) for
    every module that may hold a targeted parameter; another method's wrapper blocks its base's parameters."""
    if id(module) in seen:
        return
    if isinstance(module, ParamLayer):
        seen.add(id(module))
        _walk(module.base_layer, f"{path}.base_layer", key, top, [*chain, module], out, seen)
        return
    seen.add(id(module))
    if isinstance(module, AdapterLayer):
        out.append((top, key, module.base_layer, chain, path))
        return
    if isinstance(module, ModulesToSaveWrapper):
        return
    out.append((top, key, module, chain, None))
    for name, child in module._modules.items():
        if child is not None:
            sub = f"{path}.{name}" if path else name
            _walk(child, sub, f"{key}.{name}" if key else name, sub, [], out, seen)


def _check_options(config: Any) -> None:
    bad = [(f, getattr(config, f)) for f, ok in (("lora_dropout", 0), ("fan_in_fan_out", False),
                                                  ("lora_bias", False), ("use_dora", False))
           if getattr(config, f, ok) != ok]
    init = getattr(config, "init_lora_weights", True)
    if not (isinstance(init, bool) or init == "gaussian"):
        bad.append(("init_lora_weights", init))
    if bad:
        field, value = bad[0]
        raise ValueError(f"{FIELD}: LoRA on named parameters does not work with {field}={value!r} (as in peft); "
                         "use lora_dropout=0, fan_in_fan_out=False, lora_bias=False, use_dora=False and "
                         "init_lora_weights True, False or 'gaussian'")


def plan(model: nn.Module, config: Any, adapter_name: str, module_paths: list[str],
         init: bool) -> Callable[[], None] | None:
    """Check and build LoRA on the parameters ``config.target_parameters`` names; return the function that
    attaches it (nothing in the model changes before that is called), or None when no parameter is named."""
    names = _names(config)
    if not names:
        return None
    _check_options(config)
    found: list[tuple[str, str, nn.Module, str, Tensor, list[ParamLayer]]] = []  # top path, key, owner, name ...
    hit: set[str] = set()
    owners: list = []
    _walk(model, "", "", "", [], owners, set())
    for top, key, owner, chain, blocked in owners:
        for pname, param in owner._parameters.items():
            full = f"{key}.{pname}" if key else pname
            matched = [t for t in names if full == t or full.endswith("." + t)]
            if param is None or not matched:
                continue
            hit.update(matched)
            if not key:
                raise ValueError(f"{FIELD}: {full!r} is a parameter of the top-level module, which cannot be wrapped "
                                 "(as in peft); target a parameter of a submodule")
            if blocked is not None or top in module_paths:
                raise ValueError(f"{FIELD}: {full!r} belongs to {key!r}, which target_modules (or another "
                                 "method) already adapts as a module; leave it out of target_modules")
            found.append((top, full, owner, pname, param, chain))
    missing = [t for t in names if t not in hit]
    if missing:
        examples = sorted({f"{k}.{p}" if k else p for _, k, o, _, _ in owners for p, v in o._parameters.items()
                           if v is not None and v.dim() >= 2}, key=lambda n: (-n.count("experts"), n))[:6]
        raise TargetError(f"{FIELD}: {missing[0]!r} matches no parameter of {type(model).__name__}; expected the "
                          f"dotted name of an nn.Parameter or a suffix of it, e.g. {examples}")
    # every adapter with target_parameters targets the same parameters (as peft: the nesting names the file keys)
    existing = {(id(layer.owner()), layer.parameter_name) for _, _, _, chain, _ in owners
                for layer in chain if len(layer.adapters)}
    wanted = {(id(owner), pname) for _, _, owner, pname, _, _ in found}
    if existing and existing != wanted:
        raise ValueError(f"{FIELD}: all adapters that use target_parameters must target the same parameters (as "
                         f"in peft); adapter {adapter_name!r} targets {len(wanted)} parameters ({names}), the "
                         f"adapters already on the model {len(existing)}")
    built = []
    for top, full, owner, pname, param, chain in found:
        if param.dim() not in (2, 3) or not param.is_floating_point():
            raise ValueError(f"{FIELD}: {full!r} has shape {tuple(param.shape)} and dtype {param.dtype}; LoRA "
                             "factors a floating-point 2-D (out, in) matrix or 3-D (num_experts, out, in) expert "
                             "stack")
        if 0 in param.shape:
            raise ValueError(f"{FIELD}: {full!r} has shape {tuple(param.shape)}; expected no empty dimension")
        transposed = bool(getattr(owner, "is_transposed", False))
        adapter = ParamLoraAdapter(param, pname, config, full, transposed=transposed, init=init)
        built.append((top, owner, pname, chain, adapter))

    def attach() -> None:
        made: dict[str, ParamLayer] = {}  # top path -> the outermost wrapper made here
        for top, owner, pname, chain, adapter in built:
            layer = next((lay for lay in chain if lay.parameter_name == pname), None)
            if layer is None:  # wrap the outermost module of the chain: a later parameter nests outside
                current = made.get(top) or (chain[0] if chain else owner)
                layer = ParamLayer(current, pname)
                _set_submodule(model, top, layer)
                made[top] = layer
            layer.add(adapter_name, adapter)

    return attach


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)
