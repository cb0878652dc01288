"""What autograd keeps for backward: the tensors saved while a function runs, leaving out module weights."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def saved_tensors(fn: Callable[[], Any], *modules: nn.Module, buffers: bool = False) -> list[torch.Tensor]:
    """The tensors autograd saves during ``fn()`` that are not (views of) ``modules``' parameters (nor, with
    ``buffers``, their buffers), in the order they were saved."""
    skip = {p.untyped_storage().data_ptr() for m in modules for p in m.parameters()}
    if buffers:
        skip |= {b.untyped_storage().data_ptr() for m in modules for b in m.buffers()}
    kept: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in skip:
            kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return kept


def saved_shapes(fn: Callable[[], Any], *modules: nn.Module, buffers: bool = False) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in saved_tensors(fn, *modules, buffers=buffers)]
