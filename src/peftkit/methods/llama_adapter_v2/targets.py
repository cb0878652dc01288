"""Where LLaMA-Adapter V2 acts in a model: the language model's attention layers, its blocks' linear layers, its
normalization layers, and the module that gives the projected image features (LLaVA's ``multi_modal_projector``).

Paths are the model's real ones: a module already wrapped by another adapter is named by its wrapper's path,
and the modules inside it through ``base_layer`` (``...self_attn.base_layer.q_proj``), so the tuner adds the new
adapter to the existing wrapper, or wraps a plain module inside another wrapper's base, never a wrapper twice.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ...layers import AdapterLayer
from ...saved_modules import ModulesToSaveWrapper
from ...targeting import NotApplicableError
from ..prompt.adaption_prompt import MODEL_TABLE
from ...kernel_helpers import CONV1D_TYPES

LINEAR_TYPES: tuple[type, ...] = (nn.Linear, *CONV1D_TYPES)


def is_norm(module: nn.Module) -> bool:
    """A LayerNorm, or a model's own RMSNorm (``LlamaRMSNorm``), with a per-feature weight."""
    weight = getattr(module, "weight", None)
    return (isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")) and (
        weight is None or weight.dim() == 1)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def real_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of every module, wrappers unwrapped: an ``AdapterLayer`` at P is listed as (P, its base)
    and its base's children under ``P.base_layer``; a ``ModulesToSaveWrapper`` as itself, without its copies."""
    out: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()

    def walk(prefix: str, module: nn.Module) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        if isinstance(module, ModulesToSaveWrapper):
            out.append((prefix, module))
            return
        if isinstance(module, AdapterLayer):
            out.append((prefix, module.base_layer))
            seen.add(id(module.base_layer))
            module, prefix = module.base_layer, _join(prefix, "base_layer")
        else:
            out.append((prefix, module))
        for name, child in module._modules.items():
            if child is not None:
                walk(_join(prefix, name), child)

    walk("", model)
    return out


@dataclasses.dataclass
class Sites:
    """The language model's parts, in model order (paths as ``real_modules`` names them)."""

    attention: list[str]  # one per block
    linears: list[str]  # the blocks' Linear / Conv1D layers
    norms: list[str]  # the language model's normalization layers (the blocks' and the final one)
    visual: list[str]  # modules matching visual_module


def _parent(path: str) -> str:
    parent = path.rpartition(".")[0]
    return parent[: -len(".base_layer")] if parent.endswith(".base_layer") else parent


def find_sites(model: nn.Module, visual_module: str) -> Sites:
    """Find the language model by its attention modules (those of an architecture in LLaMA-Adapter's table, named
    as the table's attention submodule); raise ``NotApplicableError`` when there are none."""
    named = real_modules(model)
    attention = [p for p, m in named if p and p.rpartition(".")[2] == MODEL_TABLE.get(
        getattr(getattr(m, "config", None), "model_type", None), ("",))[0]]
    if not attention:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise NotApplicableError(
            f"llama_adapter_v2 prompts {sorted(MODEL_TABLE)} attention (a language model, alone or inside a "
            f"vision-language model such as LLaVA); {type(model).__name__} (model_type {model_type!r}) has none")
    blocks = tuple(_parent(p) + "." for p in attention)
    roots = {_parent(_parent(_parent(p))) for p in attention}  # the language model: the blocks' list's parent
    root_prefixes = tuple(r + "." if r else "" for r in roots)
    linears = [p for p, m in named if isinstance(m, LINEAR_TYPES) and p.startswith(blocks)]
    norms = [p for p, m in named if is_norm(m) and p.startswith(root_prefixes)]
    visual = [p for p, _ in named if p == visual_module or p.endswith("." + visual_module)]
    return Sites(attention, linears, norms, visual)


def layer_index(path: str) -> int:
    """The block index of an attention path (``...layers.3.self_attn`` -> 3)."""
    index = _parent(path).rpartition(".")[2]
    if not index.isdigit():
        raise ValueError(f"llama_adapter_v2: cannot read a layer index from {path!r}")
    return int(index)
