"""peft's rewrite of a LoRA config for the mixture-of-experts models transformers 5 fused.

transformers 5 keeps the experts of Mixtral and of the Qwen2-MoE family (Qwen3-MoE, OLMoE, ...) as stacked
parameters (``experts.gate_up_proj``, ``experts.down_proj``) and their router as a module that is no
``nn.Linear`` (``gate.weight``). peft 0.21.2 (``utils/transformers_weight_conversion.py``,
``_convert_peft_config_moe``) rewrites every LoRA config on such a model before targeting, in place:

- ``target_modules`` naming the version-4 expert / router modules (Mixtral: ``w1``, ``w3``, ``w2``, ``gate``;
  Qwen: ``gate_proj``, ``up_proj``, ``down_proj``, ``gate``) move to ``target_parameters`` (``gate_up_proj``,
  ``down_proj``, ``gate.weight``);
- ``"all-linear"`` becomes the leaf names of the model's Linear layers (the output head left out) plus all of
  those version-4 names, so it adapts the attention projections, the router and both expert stacks;
- a regex becomes the leaf names of what it matches, the fused experts recovered by their version-4 names;
- the two halves of a fused stack (``w1`` and ``w3`` into ``gate_up_proj``) must be targeted together, and
  then get rank and alpha doubled there (``rank_pattern`` / ``alpha_pattern``: ``.*\\.gate_up_proj``).

Here the same rewrite, with one difference: a config that names none of those modules is left as it is (peft
also turns a regex into leaf names then, which widens e.g. a layer-restricted regex to every layer; and
``target_modules=None`` keeps peftkit's default targets, where peft leaves an empty set and raises).
"""

from __future__ import annotations

import itertools
import re
from typing import Any

from torch import nn

from ...targeting import ALL_LINEAR, all_linear_targets, is_target

# as peft's tables (utils/transformers_weight_conversion.py)
TARGET_MODULE_MAPPING: dict[str, dict[str, str]] = {
    "mixtral": {"gate": "gate.weight", "w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"},
    "qwen2_moe": {"gate": "gate.weight", "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj",
                  "down_proj": "down_proj"},
}
FUSED_TARGETS: dict[str, dict[str, list[str]]] = {
    "mixtral": {"gate_up_proj": ["w1", "w3"]},
    "qwen2_moe": {"gate_up_proj": ["gate_proj", "up_proj"]},
}


def conversion_family(model: nn.Module) -> str | None:
    """The key of the tables above for ``model`` (transformers' conversion pattern of its model type), or None."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if not isinstance(model_type, str):
        return None
    try:
        from transformers.conversion_mapping import _MODEL_TO_CONVERSION_PATTERN, get_checkpoint_conversion_mapping
    except ImportError:  # transformers < 5: the experts are still modules
        return None
    if get_checkpoint_conversion_mapping(model_type) is None:
        return None
    family = {**_MODEL_TO_CONVERSION_PATTERN, "mixtral": "mixtral"}.get(model_type)
    return family if family in TARGET_MODULE_MAPPING else None


def _resolve_string(model: nn.Module, named: list[tuple[str, nn.Module]], config: Any,
                    mapping: dict[str, str]) -> set[str]:
    """peft's ``_resolve_string_target_modules``: leaf names a regex or ``"all-linear"`` stands for."""
    targets = config.target_modules
    if targets.lower() == ALL_LINEAR:
        paths = all_linear_targets(model, named, getattr(config, "task_type", None))
        return {p.rsplit(".", 1)[-1] for p in paths} | set(mapping)
    module_keys = [name for name, _ in named if name]
    param_keys = [name for name, _ in model.named_parameters()]
    matched = {k.rsplit(".", 1)[-1] for k in itertools.chain(module_keys, param_keys) if is_target(config, k, targets)}
    containers: dict[str, set[str]] = {}
    for name in param_keys:
        container, _, leaf = name.rpartition(".")
        containers.setdefault(leaf, set()).add(container)
    for old, new in mapping.items():
        if old not in matched and any(is_target(config, f"{c}.{old}", targets) for c in containers.get(new, ())):
            matched.add(old)
    return matched


def convert_config(model: nn.Module, named: list[tuple[str, nn.Module]], config: Any) -> None:
    """Rewrite ``config`` in place as peft does on a fused MoE model (see the module doc)."""
    if getattr(config, "target_modules", None) is None:
        return
    family = conversion_family(model)
    if family is None:
        return
    mapping, fused = TARGET_MODULE_MAPPING[family], FUSED_TARGETS[family]
    targets = config.target_modules
    if isinstance(targets, str):
        targets = _resolve_string(model, named, config, mapping)
    params = set(config.target_parameters or ())
    remaining: set[str] = set()
    present: dict[str, set[str]] = {new: set() for new in fused}
    moved = False
    for target in targets:
        old = next((o for o in mapping if target == o or target.endswith(f".{o}")), None)
        if old is None:
            remaining.add(target)
            continue
        moved = True
        params.add(mapping[old])
        if mapping[old] in fused:
            present[mapping[old]].add(old)
    if not moved:
        return
    rank, alpha = dict(config.rank_pattern or {}), dict(config.alpha_pattern or {})
    for new, required in fused.items():
        got = present[new]
        if 0 < len(got) < len(required):
            raise ValueError(f"LoraConfig.target_modules: cannot convert {', '.join(sorted(got))} without also "
                             f"targeting {', '.join(sorted(set(required) - got))}: transformers 5 fuses them into "
                             f"{new} (as in peft)")
        if len(got) == len(required) > 1:
            rank[rf".*\.{re.escape(new)}"] = config.r * len(required)
            alpha[rf".*\.{re.escape(new)}"] = config.lora_alpha * len(required)
    config.rank_pattern, config.alpha_pattern = rank, alpha
    config.target_parameters = sorted(params)
    config.target_modules = remaining
