"""Mixed-adapter batches: batch row i runs through adapter ``names[i]`` ("__base__": the base alone).

The wrapper layer (``AdapterLayer``) runs the base once for the whole batch, then hands the rows to each
adapter method. A method that opts in with ``Adapter.batched_forward`` computes all its adapters' rows in one
gathered pass (BGMV style, as Punica / S-LoRA): its adapters' tensors are stacked once (cached, see
:func:`cached_stack`), with one extra neutral slot (zero for LoRA, one for (IA)3) that the rows of other
adapters and of "__base__" gather, and the per-row tensors are gathered with the row -> slot index. Methods
without a batched path fall back to the generic loop: per adapter, ``index_select`` its rows, run its
forward, ``index_copy`` them back.

Routing is per call, never stored on the shared layers: :func:`routed` puts a :class:`Route` (the names, by layer,
and the call's plans) in a thread-local slot, so request threads sharing one model each see only their own call's
names. Layers look it up only while some route is open in some thread (:data:`ANY`), so the unrouted hot path costs
one global read, as the attribute it replaces did. Thread-local rather than a ``ContextVar``: ``torch.compile``
traces a thread-local read (and guards on it), but graph-breaks on ``ContextVar.get``, which would break (or, with
``fullgraph=True``, fail) every compiled unrouted call made while another thread routes. A routed call is one
synchronous ``forward`` / ``generate``, so asyncio tasks cannot interleave inside it; a hand-made ``route`` block
must not ``await`` (other tasks of the thread would see its names).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
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


class Route:
    """One routed call (``routed``): each routed layer's per-row names (by ``id``; the layers are held, so the ids
    stay theirs) and the plans built for them during the call (so a ``generate`` builds each layer's once)."""

    __slots__ = ("names", "layers", "plans")

    def __init__(self, names: dict[int, list[str]], layers: list[Any]) -> None:
        self.names, self.layers = names, layers
        self.plans: dict[int, tuple[tuple, RoutePlan]] = {}


class _Local(threading.local):
    route: Route | None = None  # this thread's innermost open ``routed`` block


_LOCAL = _Local()
# True while a ``routed`` block is open in any thread: only then do layers read ``_LOCAL`` (slower than a global).
# A bool, not the count, so ``torch.compile`` specializes on two values at most.
ANY = False
_open = 0
_lock = threading.Lock()


def names_for(layer: Any) -> list[str] | None:
    """The per-row adapter names of the call this thread is making through ``layer``, or None."""
    if not ANY:
        return None
    route = _LOCAL.route
    return None if route is None else route.names.get(id(layer))


@contextlib.contextmanager
def routed(layers: Sequence[Any], names: Sequence[str]) -> Iterator[None]:
    """Within the block, and only in this thread, row i of a batch through any of ``layers`` uses adapter
    ``names[i]``. Blocks nest (the inner one decides for its layers)."""
    global ANY, _open
    outer = _LOCAL.route
    names = list(names)
    table = dict(outer.names) if outer is not None else {}
    table.update((id(layer), names) for layer in layers)
    _LOCAL.route = Route(table, [*layers, *(outer.layers if outer is not None else ())])
    with _lock:
        _open += 1
        ANY = True
    try:
        yield
    finally:
        _LOCAL.route = outer
        with _lock:
            _open -= 1
            ANY = _open > 0


def plan_for(layer: Any, x: Tensor, names: list[str]) -> RoutePlan:
    """The layer's plan for ``names`` in the current route (built once per call and layer)."""
    if x.shape[0] != len(names):
        raise ValueError(
            f"adapter_names has {len(names)} entries but the batch has {x.shape[0]} rows "
            f"(adapters named: {sorted(set(names))}); give one name per row"
        )
    route = _LOCAL.route
    plans = route.plans if route is not None else {}
    key = (names, tuple(layer.adapters.keys()), x.device)
    cached = plans.get(id(layer))
    if cached is not None and cached[0][0] is names and cached[0][1:] == key[1:]:
        return cached[1]
    plan = RoutePlan(names, layer.adapters, x.device)
    plans[id(layer)] = (key, plan)
    return plan


def routed_forward(layer: Any, names: list[str], x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """A mixed batch through one ``AdapterLayer``: the base once, then each method's rows (row i: ``names[i]``)."""
    plan = plan_for(layer, x, names)
    base = layer.base_layer
    out = base(x, *args, **kwargs)
    # stacked adapter tensors, reused across calls: entries are (key, value) tuples replaced whole, so threads
    # sharing the dict read a consistent entry (see cached_stack)
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
