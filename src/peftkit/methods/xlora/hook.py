"""X-LoRA's two passes, per call, without state on the layers.

``call_context`` (``Adapter.call_context``) marks one ``PeftModel`` forward / generate as an X-LoRA call in a
thread-local: the active X-LoRA adapters' heads and sizes. A forward pre-hook on the user's model (installed
once, ``install_model_hooks``) runs, for every model forward inside such a call (each ``generate`` step too):

1. the scaling pass: the model's own ``forward`` without grad, with every expert weighted by
   ``scaling_pass_value``, asked for its hidden states;
2. the head on the last hidden state -> scalings ``(b, s, n_layers, n_experts)``, kept in the thread-local for
   the layers of the real pass that follows (the hook returns and the model runs as called).

KV cache: the scaling pass is another model (other expert weights), so it keeps its own cache, paired with the
call's cache object in a weak map: ``generate`` with ``use_cache=True`` and a hand-written decoding loop that
feeds ``past_key_values`` back both see consistent caches. peft forces ``use_cache=False`` instead.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from . import functional as XF

_TLS = threading.local()  # .call: {owner id: Owner} or None; .dummy: bool; .scalings: {owner id: Tensor}
_CACHES: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()  # call's cache -> scaling pass's
_HOOKS = "_xlora_hook_handles"
_LOG = "_xlora_scalings_log"  # on the user's model: {"enabled": bool, "entries": [Tensor, ...]}


class Owner:
    """One active X-LoRA adapter in a call: its config, head tensors and layer count."""

    def __init__(self, config: Any, shared: nn.Module, n_layers: int) -> None:
        self.config, self.shared, self.n_layers = config, shared, n_layers
        self.n_experts = len(config.adapters)

    def head(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        idx = XF.head_indices(self.config.xlora_depth, self.config.xlora_dropout_p)
        t = self.shared.tensors()
        return [t[f"layers_{i}_weight"] for i in idx], [t[f"layers_{i}_bias"] for i in idx]


def scalings_for(owner_id: int) -> torch.Tensor | None:
    """The scalings the layers of ``owner_id`` use now, or None outside an X-LoRA call (peft: plain sum)."""
    found = getattr(_TLS, "scalings", None)
    return None if found is None else found.get(owner_id)


def in_scaling_pass() -> bool:
    return bool(getattr(_TLS, "dummy", False))


@contextlib.contextmanager
def xlora_call(owners: dict[int, Owner]) -> Iterator[None]:
    saved = (getattr(_TLS, "call", None), getattr(_TLS, "scalings", None), getattr(_TLS, "dummy", False))
    _TLS.call, _TLS.scalings, _TLS.dummy = owners, None, False
    try:
        yield
    finally:
        _TLS.call, _TLS.scalings, _TLS.dummy = saved


_CACHE_KEYS = ("cache", "past_key_values")  # transformers 5's name, then the older one


def _output_cache(output: Any) -> Any:
    """The KV cache a model output carries (read as a dict: the attribute of the old name warns)."""
    if not isinstance(output, dict):
        return None
    return next((output[k] for k in _CACHE_KEYS if output.get(k) is not None), None)


def _batch_shape(args: tuple, kwargs: dict) -> tuple[int, int, torch.device]:
    ref = kwargs.get("input_ids", args[0] if args else None)
    if ref is None:
        ref = kwargs.get("inputs_embeds")
    if ref is None:
        raise ValueError("X-LoRA: the call has neither input_ids nor inputs_embeds; the scaling pass needs one")
    return ref.shape[0], ref.shape[1], ref.device


def _scaling_cache(module: nn.Module, cache: Any) -> Any:
    """The scaling pass's own cache for the call's ``cache`` (None: no cache)."""
    if cache is None:
        return None
    if cache in _CACHES:
        return _CACHES[cache]
    length = cache.get_seq_length() if hasattr(cache, "get_seq_length") else None
    if length:
        raise ValueError(f"X-LoRA: past_key_values holds {length} positions that this X-LoRA model did not compute "
                         "(its scaling pass needs its own cache of them): pass a cache that an X-LoRA call returned, "
                         "or an empty one")
    from transformers import DynamicCache

    try:
        return DynamicCache(config=getattr(module, "config", None))
    except TypeError:  # older transformers
        return DynamicCache()


def _pre_forward(module: nn.Module, args: tuple, kwargs: dict) -> None:
    owners = getattr(_TLS, "call", None)
    if not owners or in_scaling_pass():
        return None
    bsz, seq, device = _batch_shape(args, kwargs)
    dummy = {}
    for oid, o in owners.items():
        dtype = next(iter(o.shared.tensors().values())).dtype
        dummy[oid] = torch.full((bsz, seq, o.n_layers, o.n_experts), float(o.config.scaling_pass_value),
                                dtype=dtype, device=device)
    cache_key = next((k for k in _CACHE_KEYS if kwargs.get(k) is not None), None)
    call_cache = kwargs[cache_key] if cache_key else None
    own_cache = _scaling_cache(module, call_cache)
    kw = {**kwargs, "output_hidden_states": True, "return_dict": True}
    kw.pop("labels", None)
    if cache_key is not None:
        kw[cache_key] = own_cache
    _TLS.dummy, _TLS.scalings = True, dummy
    try:
        with torch.no_grad():
            res = module.forward(*args, **kw)
    finally:
        _TLS.dummy, _TLS.scalings = False, None
    hidden = res.hidden_states[-1]
    scalings = {}
    for oid, o in owners.items():
        weights, biases = o.head()
        c = o.config
        scalings[oid] = XF.head_scalings(hidden.to(weights[0].dtype), weights, biases, o.n_layers, o.n_experts,
                                         c.layerwise_scalings, c.enable_softmax, c.softmax_temperature,
                                         c.xlora_dropout_p, module.training)
    _TLS.scalings = scalings
    _TLS.latest = scalings
    log = vars(module).get(_LOG)
    if log is not None and log["enabled"]:
        log["entries"].append(next(iter(scalings.values())))
    _TLS.pending = _output_cache(res)
    return None


def _post_forward(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    pending = getattr(_TLS, "pending", None)
    _TLS.pending = None
    if pending is None or not getattr(_TLS, "call", None):
        return None
    cache = _output_cache(output)
    if cache is not None and cache is not pending:
        try:
            _CACHES[cache] = pending
        except TypeError:  # not weak-referenceable: a later call with it is refused (_scaling_cache)
            pass
    return None


def get_latest_scalings() -> torch.Tensor | None:
    """peft's ``get_latest_scalings``: the scalings ``(b, s, n_layers, n_experts)`` of this thread's last X-LoRA
    forward (of the first active X-LoRA adapter), None before one. Reached from the PeftModel through attribute
    forwarding (``install`` sets it on the user's model)."""
    latest = getattr(_TLS, "latest", None)
    return next(iter(latest.values())) if latest else None


def install(model: nn.Module) -> None:
    if getattr(model, _HOOKS, None):
        return
    handles = (model.register_forward_pre_hook(_pre_forward, with_kwargs=True),
               model.register_forward_hook(_post_forward, with_kwargs=True))
    object.__setattr__(model, _HOOKS, handles)
    object.__setattr__(model, _LOG, {"enabled": False, "entries": []})
    for name, fn in _API.items():
        object.__setattr__(model, name, functools.partial(fn, weakref.ref(model)))


def remove(model: nn.Module) -> None:
    for handle in getattr(model, _HOOKS, None) or ():
        handle.remove()
    for name in (_HOOKS, _LOG, *_API):
        if name in vars(model):
            object.__delattr__(model, name)


# -- peft's XLoraModel methods, reached from the PeftModel through attribute forwarding -----------------------
def _configs(ref: "weakref.ref[nn.Module]") -> list[Any]:
    """The distinct configs of the model's X-LoRA adapters (the objects the layers read on every call)."""
    found: dict[int, Any] = {}
    for m in ref().modules():
        if getattr(m, "expert_ids", None) is not None and "config" in vars(m):
            found.setdefault(id(m.config), m.config)
    return list(found.values())


def set_topk_lora(ref: Any, value: int | None) -> None:
    """Keep only the top-k experts' scalings per token (None: all, dense); reflected in the config."""
    for c in _configs(ref):
        c.top_k_lora = value


def set_global_scaling_weight(ref: Any, weight: float) -> None:
    """The scalar every expert's output is multiplied by (default 1); reflected in the config."""
    for c in _configs(ref):
        c.global_scaling_weight = weight


def get_global_scaling_weight(ref: Any) -> float:
    return _configs(ref)[0].global_scaling_weight


def set_scaling_pass_value(ref: Any, value: float | None) -> None:
    """The scaling every expert gets in the scaling pass; None: 1 / n_experts (peft's rule)."""
    for c in _configs(ref):
        c.scaling_pass_value = 1 / len(c.adapters) if value is None else value


def enable_scalings_logging(ref: Any) -> None:
    vars(ref())[_LOG]["enabled"] = True


def disable_scalings_logging(ref: Any) -> None:
    """Stop logging, keeping the log."""
    vars(ref())[_LOG]["enabled"] = False


def clear_scalings_log(ref: Any) -> None:
    vars(ref())[_LOG]["entries"].clear()


def get_scalings_log(ref: Any) -> list[torch.Tensor]:
    """A copy of the list of logged scalings, each (batch, seq, n_layers, n_experts) (the tensors are shared)."""
    return list(vars(ref())[_LOG]["entries"])


def get_bucketed_scalings_log(ref: Any) -> dict[int, tuple[list[int], list[torch.Tensor]]]:
    """The log bucketed by sequence length: {seq_len: ([positions in the log], [scalings])}."""
    buckets: dict[int, tuple[list[int], list[torch.Tensor]]] = {}
    for i, s in enumerate(get_scalings_log(ref)):
        positions, tensors = buckets.setdefault(s.shape[1], ([], []))
        positions.append(i)
        tensors.append(s)
    return buckets


_API = {"get_latest_scalings": lambda ref: get_latest_scalings(), "set_topk_lora": set_topk_lora,
        "set_global_scaling_weight": set_global_scaling_weight, "get_global_scaling_weight": get_global_scaling_weight,
        "set_scaling_pass_value": set_scaling_pass_value, "enable_scalings_logging": enable_scalings_logging,
        "disable_scalings_logging": disable_scalings_logging, "clear_scalings_log": clear_scalings_log,
        "get_scalings_log": get_scalings_log, "get_bucketed_scalings_log": get_bucketed_scalings_log}
