"""Which modules a config touches.

Matching follows Hugging Face PEFT so that existing configs select the same modules:

- a list entry matches a module path exactly or as a dotted suffix (``"q_proj"`` matches
  ``model.layers.0.self_attn.q_proj``);
- a plain string is a full-match regular expression over the module path;
- ``"all-linear"`` selects every Linear / GPT-2 Conv1D except the output head;
- ``exclude_modules`` (same rules) wins over targets, and ``modules_to_save`` are never targeted;
- ``layers_to_transform`` / ``layers_pattern`` keep only the given layer indices.

Default targets come from one role table per architecture family.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from .config import TaskType

try:  # GPT-2 style linear layer with a transposed weight
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a runtime dependency
    Conv1D = ()  # type: ignore[assignment]

ALL_LINEAR = "all-linear"
LINEAR_TYPES: tuple[type, ...] = (nn.Linear,) + ((Conv1D,) if isinstance(Conv1D, type) else ())

# role -> module name, per architecture family (``model.config.model_type``, or the class name for
# models without a transformers config). One table for every method.
ROLE_TABLE: dict[str, dict[str, str | tuple[str, ...]]] = {
    "llama": {"query": "q_proj", "key": "k_proj", "value": "v_proj", "attn_out": "o_proj",
              "ffn_gate": "gate_proj", "ffn_in": "up_proj", "ffn_out": "down_proj",
              "attention_output": "o_proj", "ffn_output": "down_proj", "ffn": "mlp"},
    "gpt2": {"qkv": "c_attn", "attn_out": "attn.c_proj", "ffn_in": "c_fc", "ffn_out": "mlp.c_proj",
             "attention_output": "attn.c_proj", "ffn_output": "mlp.c_proj", "ffn": "mlp"},
    "bert": {"query": "query", "key": "key", "value": "value", "attn_out": "attention.output.dense",
             "ffn_in": "intermediate.dense", "ffn_out": "output.dense",
             # the FFN is split over intermediate + output (see SPLIT_FFN): "ffn" names its output Linear
             "attention_output": "attention.output.dense", "ffn_output": "output.dense", "ffn": "output.dense"},
    "t5": {"query": "q", "key": "k", "value": "v", "attn_out": "o", "ffn_in": "wi", "ffn_out": "wo",
           "attention_output": "o", "ffn_output": "wo", "ffn": "DenseReluDense"},
    # transformers 5 renamed ViT's projections; both spellings are listed, the present one is used
    "vit": {"query": ("query", "q_proj"), "key": ("key", "k_proj"), "value": ("value", "v_proj"),
            "attn_out": ("attention.output.dense", "o_proj"), "ffn_in": ("intermediate.dense", "fc1"),
            "ffn_out": ("output.dense", "fc2"), "attention_output": ("attention.output.dense", "o_proj"),
            "ffn_output": ("output.dense", "fc2"), "ffn": "mlp",
            # whole-block roles (VPT): the module returning [CLS] + patch tokens, the list of blocks
            "vision_embeddings": "embeddings", "vision_layers": ("encoder.layer", "layers")},
    "clip": {"query": "q_proj", "key": "k_proj", "value": "v_proj", "attn_out": "out_proj",
             "ffn_in": "fc1", "ffn_out": "fc2", "attention_output": "out_proj", "ffn_output": "fc2", "ffn": "mlp",
             # vision tower blocks (VPT), text token embedding (CoOp), projected features (CLIP-/Tip-Adapter)
             "vision_embeddings": ("vision_model.embeddings", "embeddings"),
             "vision_layers": ("vision_model.encoder.layers", "encoder.layers"),
             "text_token_embedding": "embeddings.token_embedding",
             "image_features": "visual_projection", "text_features": "text_projection"},
    "unet": {"query": "to_q", "key": "to_k", "value": "to_v", "attn_out": "to_out.0",
             "ffn_in": "ff.net.0.proj", "ffn_out": "ff.net.2",
             "attention_output": "to_out.0", "ffn_output": "ff.net.2", "ffn": "ff"},
}
# Families whose FFN is not one module but two siblings, (output module, input module): BERT's
# ``intermediate`` (d -> d_ff, activation) and ``output`` (d_ff -> d, dropout, residual, LayerNorm). A module
# parallel to the whole FFN wraps the output Linear and reads the FFN input at the input Linear's input.
SPLIT_FFN: dict[str, tuple[str, str]] = {"bert": ("output.dense", "intermediate.dense")}
# families that share a table with another
FAMILY_ALIASES = {
    "mistral": "llama", "qwen2": "llama", "gemma": "llama", "phi3": "llama",
    "roberta": "bert", "xlm-roberta": "bert", "distilbert": "bert", "electra": "bert",
    "mt5": "t5", "clip_text_model": "clip", "clip_vision_model": "clip", "siglip": "clip",
    "unet2dconditionmodel": "unet", "transformer2dmodel": "unet",
}


class TargetError(ValueError):
    """A config's targets match nothing, or match something the method cannot wrap."""


class NotApplicableError(TargetError):
    """The method has nothing to act on in this model (e.g. BitFit on a model without biases)."""


def model_family(model: nn.Module) -> str | None:
    """The ROLE_TABLE key for ``model``, or None when its architecture is unknown."""
    cfg = getattr(model, "config", None)
    model_type = cfg.get("model_type") if isinstance(cfg, dict) else getattr(cfg, "model_type", None)
    for key in (model_type, type(model).__name__.lower()):
        if key:
            key = FAMILY_ALIASES.get(key, key)
            if key in ROLE_TABLE:
                return key
    return None


# roles that a fused query/key/value projection (GPT-2's ``c_attn``, role "qkv") stands in for
_QKV_ROLES = ("query", "key", "value")

Roles = Sequence[str] | Mapping[str, Sequence[str]]


def family_roles(roles: Roles, family: str | None) -> Sequence[str]:
    """A method's default roles on ``family``: a plain sequence, or a mapping family -> roles with "*" the rest."""
    if isinstance(roles, Mapping):
        return roles.get(family or "*", roles["*"])
    return roles


def role_names(model: nn.Module, named: list[tuple[str, nn.Module]], roles: Roles) -> list[str]:
    """Module names for ``roles`` on ``model``'s architecture ([] when it is unknown).

    A query / key / value role the family lacks maps to its fused "qkv" projection (once); a role listing
    several spellings resolves to the one present in the model.
    """
    family = model_family(model)
    if family is None:
        return []
    table = ROLE_TABLE[family]
    wanted: list[str | tuple[str, ...]] = []
    for role in family_roles(roles, family):
        entry = table.get(role) or (table.get("qkv") if role in _QKV_ROLES else None)
        if entry is not None and entry not in wanted:
            wanted.append(entry)
    paths = [n for n, _ in named]
    names = []
    for entry in wanted:
        options = (entry,) if isinstance(entry, str) else entry
        present = [o for o in options if any(p == o or p.endswith("." + o) for p in paths)]
        names.extend(present[:1] or options[:1])
    return names


def role_paths(model: nn.Module, named: list[tuple[str, nn.Module]], role: str) -> list[str]:
    """Full paths of the modules playing ``role`` on ``model``'s architecture ([] when it has none).

    The most specific table entry wins: a path that a longer entry of another role also matches belongs to
    that role (BERT's ``attention.output.dense`` is the attention output, not the FFN's ``output.dense``).
    """
    family = model_family(model)
    if family is None:
        return []
    table = ROLE_TABLE[family]
    entry = table.get(role)
    if entry is None:
        return []
    options = (entry,) if isinstance(entry, str) else entry
    paths = [n for n, _ in named if n]
    present = [o for o in options if any(p == o or p.endswith("." + o) for p in paths)][:1]
    others = [o for r, e in table.items() if r != role for o in ((e,) if isinstance(e, str) else e)]
    out = []
    for p in paths:
        hit = [o for o in present if p == o or p.endswith("." + o)]
        if hit and not any(len(o) > len(hit[0]) and (p == o or p.endswith("." + o)) for o in others):
            out.append(p)
    return out


def default_targets(
    model: nn.Module, named: list[tuple[str, nn.Module]], roles: Roles, supported: tuple[type, ...] = LINEAR_TYPES
) -> list[str]:
    """Module names for ``roles`` (e.g. ``("query", "value")``) on this architecture."""
    if model_family(model) is None:
        raise TargetError(
            f"target_modules is not set and {type(model).__name__} has no entry in peftkit's role table; "
            f"pass target_modules explicitly (candidates: {_candidates(named, supported)})"
        )
    names = role_names(model, named, roles)
    return names or role_names(model, named, ("qkv",))


def all_linear_targets(model: nn.Module, named: list[tuple[str, nn.Module]], task_type: Any = None) -> set[str]:
    """Full paths of every Linear / Conv1D except the output embedding (or the classifier head for SEQ_CLS)."""
    names = {name for name, m in named if isinstance(m, LINEAR_TYPES)}
    head = None
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            head = get_out()
        except (AttributeError, NotImplementedError):
            head = None
    if head is None and task_type == TaskType.SEQ_CLS:
        head = next((getattr(model, n) for n in ("classifier", "score") if hasattr(model, n)), None)
    if head is not None:
        names -= {name for name, m in named if m is head}
    return names


def _matches_list(key: str, names: Iterable[str]) -> bool:
    return any(key == n or key.endswith("." + n) for n in names)


def _layer_index(key: str, layers_pattern: str | Sequence[str] | None) -> int | None:
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        m = None
        for p in patterns:
            m = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
            if m:
                break
    return int(m.group("idx")) if m else None


def is_target(config: Any, key: str, targets: str | Iterable[str]) -> bool:
    """Whether module path ``key`` is selected by ``targets`` under ``config``'s exclusions and layer filter."""
    excl = getattr(config, "exclude_modules", None)
    if excl:
        if isinstance(excl, str):
            if re.fullmatch(excl, key):
                return False
        elif _matches_list(key, excl):
            return False
    for m in getattr(config, "modules_to_save", None) or ():
        if re.match(rf"(^|.*\.){m}($|\..*)", key):
            return False
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    targets = set(targets)
    if key in targets:
        return True
    if not _matches_list(key, targets):
        return False
    layers = getattr(config, "layers_to_transform", None)
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    idx = _layer_index(key, getattr(config, "layers_pattern", None))
    if idx is None:
        return False
    return idx == layers if isinstance(layers, int) else idx in layers


def resolve_targets(
    model: nn.Module,
    named: list[tuple[str, nn.Module]],
    config: Any,
    default_roles: Roles,
    supported: tuple[type, ...] = LINEAR_TYPES,
) -> str | set[str]:
    """The concrete target spec: explicit names / regex, ``all-linear`` expanded, or the role-table default."""
    targets = getattr(config, "target_modules", None)
    if targets is None:
        return set(default_targets(model, named, default_roles, supported))
    if isinstance(targets, str):
        if targets.lower() == ALL_LINEAR:
            return all_linear_targets(model, named, getattr(config, "task_type", None))
        return targets
    return set(targets)


def find_targets(
    model: nn.Module,
    named: list[tuple[str, nn.Module]],
    config: Any,
    default_roles: Roles,
    supported: tuple[type, ...],
) -> list[str]:
    """Paths of the modules ``config`` selects among ``named`` (path, module) pairs of ``model``.

    Errors name the candidate module names when nothing matches.
    """
    targets = resolve_targets(model, named, config, default_roles, supported)
    found = [name for name, _ in named if name and is_target(config, name, targets)]
    if not found:
        filters = [f for f in ("exclude_modules", "layers_to_transform", "modules_to_save") if getattr(config, f, None)]
        hint = f" after applying {', '.join(filters)}" if filters else ""
        raise TargetError(
            f"target_modules {_show(targets)} matched no module of {type(model).__name__}{hint}; "
            f"candidate module names: {_candidates(named, supported)}"
        )
    modules = dict(named)
    # a selected container (e.g. "attention") is an error, as in Hugging Face PEFT
    bad = [n for n in found if not isinstance(modules[n], supported)]
    if bad:
        kinds = ", ".join(t.__name__ for t in supported)
        raise TargetError(
            f"target module {bad[0]!r} is a {type(modules[bad[0]]).__name__}; this method wraps {kinds}"
        )
    _warn_unused_filters(config, [n for n, _ in named if n], found)
    return found


def _warn_unused_filters(config: Any, names: list[str], found: list[str]) -> None:
    """Warn about ``exclude_modules`` that exclude nothing and pattern keys that match no target."""
    excl = getattr(config, "exclude_modules", None)
    if excl:
        hit = any(re.fullmatch(excl, n) for n in names) if isinstance(excl, str) else any(
            _matches_list(n, excl) for n in names
        )
        if not hit:
            warnings.warn(f"exclude_modules={excl!r} matched no module; nothing was excluded", stacklevel=4)
    for field in ("rank_pattern", "alpha_pattern"):
        # a key names a targeted module (a regex on its path's end) or a tensor in one (AdaLoRA: "<path>.lora_E")
        unused = [k for k in getattr(config, field, None) or {}
                  if not any(re.match(rf"(.*\.)?({k})$", n) or k.startswith(n + ".") for n in found)]
        if unused:
            warnings.warn(f"{field} keys {unused} match no targeted module and are ignored", stacklevel=4)


def pattern_value(patterns: dict[str, Any] | None, key: str, default: Any) -> Any:
    """``rank_pattern`` / ``alpha_pattern`` lookup: the first regex that matches the end of ``key``."""
    for pat, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pat})$", key):
            return value
    return default


def _show(targets: str | set[str]) -> str:
    return repr(targets) if isinstance(targets, str) else repr(sorted(targets))


def _candidates(named: list[tuple[str, nn.Module]], types: tuple[type, ...] = LINEAR_TYPES) -> list[str]:
    names = sorted({n.split(".")[-1] for n, m in named if n and isinstance(m, types)})
    return names[:40]
