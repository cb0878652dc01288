"""Lily (Zhong et al. 2024, arXiv 2407.09946): low-rank interconnected adaptation across layers.

The paper gives each layer ``l`` a low-dimension projector ``LP_l`` (``A``: d_in -> r) and lets every layer
draw on one pool of ``E`` high-dimension projectors (experts ``HP_e``: r -> d_out), mixed by the layer's
router ``R_l`` (r -> E) from the projected input:

    h = W x + s sum_e w_e HP_e (LP_l x),     w = softmax(R_l (LP_l x))

Tensors and file keys (as Hugging Face PEFT; E = ``num_B``): ``lily_A.weight`` (r, d_in),
``lily_B.weight`` (E r, d_out) read as E experts (r, d_out), ``lily_router.weight`` (E, r).

Where PEFT differs from the paper (peftkit follows PEFT's numbers and files):

- the router weights are averaged over all tokens of the call (``softmax(...).reshape(-1, E).mean(0)``):
  one expert mix per forward, not one per token;
- sharing is per group of layers with the same target suffix (the longest of ``target_modules`` that ends
  the path; a regex target is one suffix; defaults and ``all-linear`` use the resolved module names) and
  the same weight shape, in module order: the experts ``B`` are those of the group's first layer, and each
  run of ``stride_A`` consecutive layers uses its first layer's ``A``; every layer has its own router;
- the file holds the shared tensors under every layer's path (each a copy of the same values);
- ``scaling`` is a plain multiplier; there is no dropout; the adapter cannot merge (the mix depends on
  the input).

Shared tensors are one ``nn.Parameter`` registered in every layer that uses it (``after_inject`` ties
them), so the trainable count is PEFT's. ``param_count`` of a layer counts what that layer owns: its
router, ``A`` when it leads a stride run, ``B`` when it leads its group (the plan is recorded on the config
when the targets are chosen). Beyond PEFT, GPT-2's Conv1D is accepted (as the equivalent nn.Linear).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ...kernel_helpers import adapter_dtype, layer_dims
from ...layers import Adapter, AdapterLayer
from ...registry import register_method
from ...targeting import LINEAR_TYPES, find_targets, resolve_targets
from . import functional as LF
from .config import LilyConfig

_PLAN = "_lily_plan"  # config attribute (not a field: never saved): path -> (group, index in the group)


def _kaiming(t: Tensor) -> Tensor:
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5))


@register_method(
    "lily",
    config=LilyConfig,
    category="reparameterized",
    modalities=("text", "vision", "vision-language", "generation"),
    mergeable=False,
    param_formula="r num_B per target + r d_in per stride_A layers + num_B r d_out per group",
    position="low-rank branch beside each targeted layer: own router, A shared by stride_A layers, experts B by the group",
    paper="arXiv 2407.09946 (Lily)",
    examples={"lily": {"r": 4, "stride_A": 2, "num_B": 3}},
)
class LilyAdapter(Adapter):
    supported_layers = LINEAR_TYPES
    default_roles = ("query", "value")  # PEFT's Lily defaults are its LoRA defaults
    checkpoint_keys = {"lily_A": "lily_A.weight", "lily_B": "lily_B.weight", "lily_router": "lily_router.weight"}

    def __init__(self, base: nn.Module, config: LilyConfig, key: str = "", init: bool = True) -> None:
        super().__init__()
        self.d_out, self.d_in = layer_dims(base)
        self.r, self.num_B, self.stride_A = config.r, config.num_B, config.stride_A
        self.scaling = config.scaling
        self.group, self.index = getattr(config, _PLAN, {}).get(key, ((key, (self.d_out, self.d_in)), 0))
        device, dtype = base.weight.device, adapter_dtype(base)
        shapes = {"lily_A": (self.r, self.d_in), "lily_B": (self.num_B * self.r, self.d_out),
                  "lily_router": (self.num_B, self.r)}
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.zeros(shape, device=device, dtype=dtype)))
        if init:
            with torch.no_grad():
                # PEFT's draws in its order: three nn.Linear default inits, then A, router and B again
                a, b, router = (_kaiming(torch.empty(s)) for s in shapes.values())
                _kaiming(a)
                _kaiming(router)
                _kaiming(b) if not config.init_weights else b.zero_()
                for p, value in ((self.lily_A, a), (self.lily_B, b), (self.lily_router, router)):
                    p.copy_(value)

    # -- targets and sharing -------------------------------------------------------------------------------
    @classmethod
    def select_targets(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: Any) -> list[str]:
        """The config's targets, and the sharing plan: path -> ((suffix, (d_out, d_in)), index in its group)."""
        paths = find_targets(model, named, config, cls.default_roles, cls.supported_layers)
        spec = resolve_targets(model, named, config, cls.default_roles, cls.supported_layers)
        modules = dict(named)
        plan: dict[str, tuple[tuple[str, tuple[int, int]], int]] = {}
        sizes: dict[tuple[str, tuple[int, int]], int] = {}
        for path in paths:
            if isinstance(spec, str):
                suffix = spec
            else:
                ends = [s for s in spec if path.endswith(s)]
                suffix = max(ends, key=lambda s: (len(s), s)) if ends else path
            group = (suffix, tuple(layer_dims(modules[path])))
            plan[path] = (group, sizes.get(group, 0))
            sizes[group] = sizes.get(group, 0) + 1
        object.__setattr__(config, _PLAN, plan)
        return paths

    @classmethod
    def after_inject(cls, model: nn.Module, adapter_name: str) -> None:
        """Tie the shared tensors: experts to the group's first layer's, ``A`` to its stride run's first."""
        groups: dict[Any, list[LilyAdapter]] = {}
        for module in model.modules():
            if isinstance(module, AdapterLayer) and isinstance(module.adapters[adapter_name] if adapter_name in
                                                               module.adapters else None, LilyAdapter):
                adapter = module.adapters[adapter_name]
                groups.setdefault(adapter.group, []).append(adapter)
        for members in groups.values():
            members.sort(key=lambda a: a.index)
            for i, adapter in enumerate(members):
                if i:
                    adapter.lily_B = members[0].lily_B
                lead = i // adapter.stride_A * adapter.stride_A
                if i != lead:
                    adapter.lily_A = members[lead].lily_A

    @classmethod
    def param_count(cls, base: nn.Module, config: LilyConfig, key: str = "") -> int:
        """What this layer owns: its router ``num_B r``, ``A`` (``r d_in``) when it leads a run of ``stride_A``
        layers of its group, the experts (``num_B r d_out``) when it leads the group. Without a recorded plan
        (a layer alone) it owns all three."""
        d_out, d_in = layer_dims(base)
        _, i = getattr(config, _PLAN, {}).get(key, (None, 0))
        own_a = i % config.stride_A == 0
        return config.num_B * config.r + own_a * config.r * d_in + (i == 0) * config.num_B * config.r * d_out

    # -- forward -------------------------------------------------------------------------------------------
    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        delta = LF.lily_forward(x.to(self.lily_A.dtype), self.lily_A, self.lily_B, self.lily_router)
        return out + (delta * self.scaling).to(out.dtype)
