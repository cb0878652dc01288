"""Mixed-adapter batches: batch row i runs through adapter ``names[i]`` ("__base__": the base alone).

The wrapper layer (``AdapterLayer``) runs the base once for the whole batch, then hands the rows to each
adapter method. A method that opts in with ``Adapter.batched_forward`` computes all its adapters' rows in one
gathered pass (BGMV style, as Punica / S-LoRA): its adapters' tensors are stacked once (cached, see
:func:`cached_stack`), with one extra neutral slot (zero for LoRA, one for (IA)3) that the rows of other
adapters and of "__base__" gather, and the per-row tensors are gathered with the row -> slot index. Methods
without a batched path fall back to the generic loop: per adapter, ``index_select`` its rows, run its
forward, ``index_copy`` them back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

class RoutePlan:
    """The per-layer work for one ``names`` list: adapter groups by method, each with a row -> slot index.

    ``groups``: (adapter class, member adapter names, index) where ``index[i]`` is the position of row i's
    adapter among the members, or ``len(members)`` (the neutral slot) for rows the group does not touch.
    """

    def __init__(self, names: Sequence[str], adapters: nn.ModuleDict, device: torch.device) -> None:
        present = [n for n in dict.fromkeys(names) if n in adapters]
        by_cls: dict[type, list[str]] = {}
        for n in present:
            by_cls.setdefault(type(adapters[n]), []).append(n)
        self.groups: list[tuple[type, list[str], Tensor]] = []
        for cls, members in by_cls.items():
            if not cls.supports_routing:
                raise ValueError(f"adapter_names: adapter(s) {members} ({cls.__name__}) change the shape of the "
                                 "layer output and cannot be mixed per row; run their rows as a separate batch")
            slot = {n: i for i, n in enumerate(members)}
            index = [slot.get(n, len(members)) for n in names]
            self.groups.append((cls, members, torch.tensor(index, dtype=torch.long, device=device)))
        self.names, self.device = names, device
        self._rows: dict[str, Tensor] = {}

    def rows(self, name: str) -> Tensor:
        """Indices of the rows that use ``name`` (built on first use: only the fallback loop needs them)."""
        if name not in self._rows:
            self._rows[name] = torch.tensor([i for i, m in enumerate(self.names) if m == name], device=self.device)
        return self._rows[name]


def plan_for(layer: Any, x: Tensor) -> RoutePlan:
    """The layer's plan for its current ``routing`` (cached while the same list and adapters stay set)."""
    names = layer.routing
    if x.shape[0] != len(names):
        raise ValueError(
            f"adapter_names has {len(names)} entries but the batch has {x.shape[0]} rows "
            f"(adapters named: {sorted(set(names))}); give one name per row"
        )
    key = (names, tuple(layer.adapters.keys()), x.device)
    cached = layer.__dict__.get("_route_plan")
    if cached is not None and cached[0][0] is names and cached[0][1:] == key[1:]:
        return cached[1]
    plan = RoutePlan(names, layer.adapters, x.device)
    layer.__dict__["_route_plan"] = (key, plan)
    return plan


def routed_forward(layer: Any, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """A mixed batch through one ``AdapterLayer``: the base once, then each method's rows."""
    plan = plan_for(layer, x)
    base = layer.base_layer
    out = base(x, *args, **kwargs)
    cache = layer.__dict__.setdefault("_batch_cache", {})
    for cls, members, index in plan.groups:
        adapters = [layer.adapters[n] for n in members]
        result = None if args or kwargs else cls.batched_forward(adapters, base, x, out, index, cache)
        if result is not None:
            out = result
            continue
        for name, adapter in zip(members, adapters):  # generic fallback: one adapter at a time
            rows = plan.rows(name)
            sub = adapter(base, x.index_select(0, rows), out.index_select(0, rows))
            out = out.index_copy(0, rows, sub)
    return out


def cached_stack(
    cache: dict, name: str, params: Sequence[Tensor], build: Callable[[], tuple[Tensor, ...]], extra: Any = None
) -> tuple[Tensor, ...]:
    """``build()`` (stacked adapter tensors), reused while ``params`` are the same tensors at the same version.

    Any in-place change (optimizer step, ``copy_`` on load or hot-swap) bumps a tensor's version and so
    rebuilds the stack. Nothing is cached while autograd could flow into ``params`` (training): the stack is
    then built for each call, differentiably.
    """
    if torch.is_grad_enabled() and any(p.requires_grad for p in params):
        return build()
    key = (tuple((id(p), p.data_ptr(), p._version, p.dtype, p.device) for p in params), extra)
    hit = cache.get(name)
    if hit is not None and hit[0] == key:
        return hit[1]
    value = tuple(t.detach() for t in build())
    cache[name] = (key, value)
    return value


def row_view(rows: Tensor, ndim: int, channel_axis: int) -> Tensor:
    """(batch, c) per-row values shaped to broadcast over a (batch, ...) activation along ``channel_axis``."""
    shape = [rows.shape[0]] + [1] * (ndim - 1)
    shape[channel_axis] = rows.shape[1]
    return rows.reshape(shape)
