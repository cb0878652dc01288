"""Which modules a config touches.

Matching follows Hugging Face PEFT so that existing configs select the same modules:

- a list entry matches a module path exactly or as a dotted suffix (``"q_proj"`` matches
  ``model.layers.0.self_attn.q_proj``);
- a plain string is a full-match regular expression over the module path;
- ``"all-linear"`` selects every Linear / GPT-2 Conv1D except the output head;
- ``exclude_modules`` (same rules) wins over targets, and ``modules_to_save`` are never targeted;
- ``layers_to_transform`` / ``layers_pattern`` keep only the given layer indices.

Default targets come from one role table per architecture family (``peftkit.default_targets``).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from .config import TaskType
from .registry import get_method
from .default_targets import (  # noqa: F401  (re-exported: the tables are part of this module's interface)
    DEFAULT_SCOPES,
    FAMILY_ALIASES,
    QUERY_VALUE,
    QUERY_VALUE_DEFAULTS,
    ROLE_OVERRIDES,
    ROLE_TABLE,
    SPLIT_FFN,
)

try:  # GPT-2 style linear layer with a transposed weight
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a runtime dependency
    Conv1D = ()  # type: ignore[assignment]

ALL_LINEAR = "all-linear"
LINEAR_TYPES: tuple[type, ...] = (nn.Linear,) + ((Conv1D,) if isinstance(Conv1D, type) else ())

class TargetError(ValueError):
    """A config's targets match nothing, or match something the method cannot wrap."""


class NotApplicableError(TargetError):
    """The method has nothing to act on in this model (e.g. BitFit on a model without biases)."""


def _family_of(key: str | None) -> str | None:
    key = FAMILY_ALIASES.get(key, key) if key else None
    return key if key in ROLE_TABLE else None


def _arch(model: nn.Module) -> tuple[str | None, str | None]:
    """(architecture key, ROLE_TABLE family): the key is ``config.model_type``, or the lowercased class name
    for models without a transformers config; both None when the architecture is unknown."""
    cfg = getattr(model, "config", None)
    model_type = cfg.get("model_type") if isinstance(cfg, dict) else getattr(cfg, "model_type", None)
    for key in (model_type, type(model).__name__.lower()):
        family = _family_of(key)
        if family is not None:
            return key, family
    return None, None


def model_family(model: nn.Module) -> str | None:
    """The ROLE_TABLE key for ``model``, or None when its architecture is unknown."""
    return _arch(model)[1]


def role_table(family: str, model_type: str | None = None) -> dict[str, str | tuple[str, ...]]:
    """``family``'s roles, with ``model_type``'s own names where it has some (ROLE_OVERRIDES)."""
    return {**ROLE_TABLE[family], **ROLE_OVERRIDES.get(model_type or "", {})}


# roles that a fused query/key/value projection (GPT-2's ``c_attn``, role "qkv") stands in for
_QKV_ROLES = ("query", "key", "value")

Roles = Sequence[str] | Mapping[str, Sequence[str]]


def family_roles(roles: Roles, family: str | None, model_type: str | None = None) -> Sequence[str]:
    """A method's default roles on an architecture.

    ``roles`` is a plain sequence, or a mapping model type / family -> roles with "*" for the rest (the model
    type's entry wins over its family's). Roles that are the query and value and that no entry of the method
    names for this architecture become the architecture's PEFT default where it differs (QUERY_VALUE_DEFAULTS).
    """
    if isinstance(roles, Mapping):
        for key in (model_type, family):
            if key is not None and key in roles:
                return roles[key]
        roles = roles["*"]
    if tuple(roles) == QUERY_VALUE:
        for key in (model_type, family):
            if key is not None and key in QUERY_VALUE_DEFAULTS:
                return QUERY_VALUE_DEFAULTS[key]
    return roles


def _role_entries(family: str, model_type: str | None, roles: Roles) -> list[str | tuple[str, ...]]:
    """The table entries for ``roles``; a query / key / value role the family lacks maps to its "qkv" (once)."""
    table = role_table(family, model_type)
    wanted: list[str | tuple[str, ...]] = []
    for role in family_roles(roles, family, model_type):
        entry = table.get(role) or (table.get("qkv") if role in _QKV_ROLES else None)
        if entry is not None and entry not in wanted:
            wanted.append(entry)
    return wanted


def _pick(entries: list[str | tuple[str, ...]], paths: list[str] | None) -> list[str]:
    """One name per entry: the spelling present among ``paths`` (the first when none is); every spelling
    when ``paths`` is None."""
    names: list[str] = []
    for entry in entries:
        options = (entry,) if isinstance(entry, str) else entry
        if paths is None:
            names.extend(options)
            continue
        present = [o for o in options if any(p == o or p.endswith("." + o) for p in paths)]
        names.extend(present[:1] or options[:1])
    return names


def role_names(model: nn.Module, named: list[tuple[str, nn.Module]], roles: Roles) -> list[str]:
    """Module names for ``roles`` on ``model``'s architecture ([] when it is unknown).

    A query / key / value role the family lacks maps to its fused "qkv" projection (once); a role listing
    several spellings resolves to the one present in the model.
    """
    model_type, family = _arch(model)
    if family is None:
        return []
    return _pick(_role_entries(family, model_type, roles), [n for n, _ in named])


def _scoped(model_type: str | None, names: list[str]) -> list[str] | str:
    """``names``, or a regex restricting them to the model type's DEFAULT_SCOPES submodule."""
    scope = DEFAULT_SCOPES.get(model_type or "")
    if scope is None or not names:
        return names
    return rf".*{re.escape(scope)}\..*\.({'|'.join(re.escape(n) for n in names)})"


def default_target_names(model_type: str, roles: str | Roles = "lora", paths: Iterable[str] | None = None
                         ) -> list[str] | str:
    """The default targets of a method on an architecture, without a model: names, or a regex string.

    ``roles`` is a method (registry name or PEFT type: its adapter's ``default_roles``) or a role spec (e.g. an
    adapter's ``feedforward_roles``). ``paths`` (module paths of the model) resolve roles with several
    spellings as on the model; without them every spelling is listed. Raises TargetError for an
    architecture the role table does not know.
    """
    family = _family_of(model_type)
    if family is None:
        raise TargetError(f"model type {model_type!r} has no entry in peftkit's role table")
    if isinstance(roles, str):
        roles = get_method(roles).adapter_cls.default_roles
    paths = None if paths is None else list(paths)
    names = _pick(_role_entries(family, model_type, roles), paths)
    return _scoped(model_type, names or _pick(_role_entries(family, model_type, ("qkv",)), paths))


def role_paths(model: nn.Module, named: list[tuple[str, nn.Module]], role: str) -> list[str]:
    """Full paths of the modules playing ``role`` on ``model``'s architecture ([] when it has none).

    The most specific table entry wins: a path that a longer entry of another role also matches belongs to
    that role (BERT's ``attention.output.dense`` is the attention output, not the FFN's ``output.dense``).
    """
    model_type, family = _arch(model)
    if family is None:
        return []
    table = role_table(family, model_type)
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
) -> list[str] | str:
    """Module names for ``roles`` (e.g. ``("query", "value")``) on this architecture, or a regex restricting
    them to a submodule (DEFAULT_SCOPES)."""
    model_type, family = _arch(model)
    if family is None:
        raise TargetError(
            f"target_modules is not set and {type(model).__name__} has no entry in peftkit's role table; "
            f"pass target_modules explicitly (candidates: {_candidates(named, supported)})"
        )
    names = role_names(model, named, roles)
    return _scoped(model_type, names or role_names(model, named, ("qkv",)))


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
    return in_layers(config, key)


def in_layers(config: Any, key: str) -> bool:
    """Whether ``key`` passes ``config``'s layer filter (``layers_to_transform`` / ``layers_pattern``; none: all)."""
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
        targets = default_targets(model, named, default_roles, supported)
        return targets if isinstance(targets, str) else set(targets)
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
    # LoRA's target_parameters are keyed by their (dotted) parameter name too: "_." stands for its module path
    found = [*found, *(f"_.{t}" for t in getattr(config, "target_parameters", None) or ())]
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
