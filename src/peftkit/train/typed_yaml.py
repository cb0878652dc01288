"""Typed YAML trees: a nested mapping read into dataclasses field by field, each value checked against its type
hint, unknown keys, duplicate keys and bad ``key=value`` overrides reported by their dotted path
(``train.lr``). The recipe schema (:mod:`peftkit.train.recipe`) is built on it."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import yaml


class RecipeError(ValueError):
    """A recipe field is unknown, of the wrong type or points at nothing; the message names its YAML path."""


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, t) for t in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is Any:
        return True
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if origin is list:
        return isinstance(value, list) and all(_type_ok(v, typing.get_args(tp)[0]) for v in value)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, tp)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(t) for t in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is dict:
        return "a mapping"
    if origin is list:
        items = typing.get_args(tp)[0]
        kinds = typing.get_args(items) if typing.get_origin(items) in (typing.Union, types.UnionType) else (items,)
        plural = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}
        return "a list of " + " or ".join(plural.get(k, str(k)) for k in kinds)
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def build(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise RecipeError(f"{path or 'recipe'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{path}." if path else ""
        raise RecipeError(f"{where}{unknown[0]}: unknown key (expected one of: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        dotted = f"{path}.{name}" if path else name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build(tp, value, dotted)
            continue
        if not _type_ok(value, tp):
            raise RecipeError(f"{dotted}: expected {_describe(tp)}, got {value!r}")
        if tp is float or (typing.get_origin(tp) in (typing.Union, types.UnionType) and isinstance(value, int)
                           and float in typing.get_args(tp)):
            value = float(value) if isinstance(value, int) and not isinstance(value, bool) else value
        kwargs[name] = value
    return cls(**kwargs)


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise RecipeError(f"{dotted}: {k} is not a mapping")
        node = nxt
    node[keys[-1]] = value


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """``key=value`` strings; values are parsed as YAML scalars (``lr=1e-3`` is a number, ``x=null`` is None)."""
    out = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"override {item!r}: expected key=value (e.g. train.lr=1e-3)")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as exc:
            raise RecipeError(f"override {key}: cannot parse {raw!r}: {exc}") from None
        if isinstance(value, str) and _looks_numeric(value):
            value = float(value)  # YAML 1.1 reads "1e-3" as a string
        out.append((key, value))
    return out


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def check_duplicate_keys(node: yaml.Node | None, path: str) -> None:
    """A key given twice in one mapping is an error (YAML loaders keep the last one silently: a second
    ``train:`` block would replace the first)."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[tuple[str, str], int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
            dotted = f"{path}.{key}" if path else key
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                line = key_node.start_mark.line + 1
                first = seen.setdefault((key_node.tag, key), line)
                if first != line:
                    raise RecipeError(f"{dotted}: duplicate key (line {line}, first at line {first})")
            check_duplicate_keys(value_node, dotted)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            check_duplicate_keys(item, f"{path}[{i}]")
