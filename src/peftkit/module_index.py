"""Lists of a model's modules that code running on every call reads, kept between calls until the tree changes.

Walking ``model.modules()`` costs ~2 us a module in Python; a hook that does it on every forward (the prefix
methods' checkpointable layers, ShadowPEFT's wrapped blocks) pays that for every step and every decoding token.
``modules_where`` keeps each list per model until a submodule is registered anywhere in the process (torch's
global module-registration hook: assigning a module attribute, ``add_module``, ``ModuleList`` item assignment;
peftkit's injection and unloading go through it). A module removed without a registration (``del`` of a
``ModuleList`` item) stays listed until the next registration.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import nn


class _Registrations:
    count = 0


def _count_registration(module: nn.Module, name: str, submodule: nn.Module | None) -> None:
    if torch.compiler.is_compiling():  # traced code: no guard on the count (any registration would recompile)
        return
    _Registrations.count += 1


torch.nn.modules.module.register_module_module_registration_hook(_count_registration)
_KEPT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {key: (registrations, modules)}


def modules_where(model: nn.Module, key: str, keep: Callable[[nn.Module], bool]) -> list[nn.Module]:
    """``[m for m in model.modules() if keep(m)]``, kept per (model, ``key``) until a submodule is registered.
    Under ``torch.compile`` the walk is traced instead (a guard on the registration count would recompile the
    graph whenever any module anywhere is registered)."""
    if torch.compiler.is_compiling():
        return [m for m in model.modules() if keep(m)]
    kept = _KEPT.get(model)
    if kept is None:
        kept = _KEPT[model] = {}
    hit = kept.get(key)
    if hit is not None and hit[0] == _Registrations.count:
        return hit[1]
    found = [m for m in model.modules() if keep(m)]
    kept[key] = (_Registrations.count, found)
    return found
