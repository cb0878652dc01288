"""Resuming a run: what differs between the recipe a checkpoint was written with and the resuming one.

A resumed run matches an uninterrupted one only when everything that shapes training is unchanged (the
method and its config, the data, the seed, the optimisation settings). :func:`check_resume` names every
such field that differs instead of continuing silently with a mix of the two.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..registry import get_method
from .recipe import Recipe, RecipeError

# fields that change only what is logged, evaluated or kept, never the trained weights: they may differ on resume
RESUME_FREE = ("resume", "output_dir", "tensorboard", "train.log_every", "train.eval_every", "train.save_every",
               "train.keep_last", "train.eval_batch_size", "train.num_threads", "data.test", "data.test_rows",
               "data.dev", "data.dev_rows")


def _flat(tree: dict[str, Any]) -> dict[str, Any]:
    """``{"train": {"lr": 1e-3}}`` -> ``{"train.lr": 1e-3}`` (one level: peft fields stay whole values); the
    ``peft`` fields the recipe leaves out take the method's config defaults, so only real changes differ."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": _plain(v) for k, v in value.items()})
        else:
            out[key] = _plain(value)
    defaults = _config_defaults(tree.get("method"))
    for name, value in defaults.items():
        out.setdefault(f"peft.{name}", value)
    return out


def _config_defaults(method: Any) -> dict[str, Any]:
    try:
        cls = get_method(str(method)).config_cls
    except (KeyError, ValueError):
        return {}
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = _plain(f.default)
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = _plain(f.default_factory())  # type: ignore[misc]
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return getattr(value, "value", value)  # enums (TaskType) as their value


def recipe_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between a checkpoint's recipe (``Recipe.to_dict()`` saved with it) and the resuming one,
    as ``"train.lr: 0.001 in the checkpoint, 0.0005 now"`` lines sorted by field; fields in
    :data:`RESUME_FREE` (logging, evaluation, checkpoint keeping) are not compared."""
    old, new = _flat(saved), _flat(current)
    # a field the checkpoint's recipe lacks was added to the schema after it was written: it had its default
    for key, value in _flat(Recipe().to_dict()).items():
        if not key.startswith("peft."):
            old.setdefault(key, value)
    out = []
    for key in sorted(set(old) | set(new)):
        if key in RESUME_FREE or old.get(key, _UNSET) == new.get(key, _UNSET):
            continue
        show = [repr(d[key]) if key in d else "not set" for d in (old, new)]
        out.append(f"{key}: {show[0]} in the checkpoint, {show[1]} now")
    return out


_UNSET = object()


def check_resume(saved: dict[str, Any] | None, recipe: Recipe, checkpoint: str) -> None:
    """Raise :class:`RecipeError` listing what differs when ``recipe`` resumes from a checkpoint written with
    the recipe ``saved`` (None: the checkpoint holds no recipe; nothing to compare)."""
    if saved is None:
        return
    diffs = recipe_differences(saved, recipe.to_dict())
    if diffs:
        raise RecipeError(f"resume: the recipe differs from {checkpoint}'s: {'; '.join(diffs)} (resume with the "
                          "checkpoint's values, or train into a new output_dir)")
