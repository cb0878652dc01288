"""The model hooks of ShadowPEFT: seed ``s^(0)`` at the top of each call, pack the dual cache, add the aux loss.

One forward pre-hook on the user's model (it runs inside every ``generate`` step too) finds the active shadow
adapter, hands the base model its own half of a ``ShadowCache``, runs the shadow network on the raw inputs
(``input_ids`` / ``inputs_embeds``, the 2-D attention mask, position ids, the backbone's cache) and opens the
call's state: a thread-local stack entry holding the running shadow state, which each wrapped block reads
and advances (``layer.ShadowLayer``), so no per-call value lives on the shared layers. The forward hook (also
on error) closes it; on success it packs ``ShadowCache(base, shadow)`` into the output when caching, and
with labels adds ``auxiliary_loss_weight x`` the shadow path's own loss on ``s^(0)`` (next-token CE through
the base LM head, or the copied classifier on the last token) to ``loss``, exposing it unweighted and
detached as ``output.shadow_loss`` and ``last_shadow_loss`` (as peft).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn

from ...module_index import modules_where
from ..prompt.inputs import bind_inputs
from . import functional as SF
from .cache import ShadowCache
from .detached import unload_shadow
from .wrapper import LOCAL, Call, ShadowLayer

_KEY = "_peftkit_shadow_hooks"


def shadow_layers(model: nn.Module) -> list[ShadowLayer]:
    """The wrapped blocks of ``model``, in module order (peft's): those of every stack the targets name (Flux.1's
    double- and single-stream blocks), not only the default one."""
    return modules_where(model, "shadow", lambda m: isinstance(m, ShadowLayer))  # kept between calls


def active(model: nn.Module) -> tuple[str, Any, ShadowLayer] | None:
    """(name, entry adapter, last wrapped block) of the active, enabled shadow adapter of ``model``, or None."""
    layers = shadow_layers(model)
    if not layers or layers[0].disable_adapters:
        return None
    if any(layer.routing is not None for layer in layers):
        raise NotImplementedError("ShadowPEFT: adapter_names (per-row routing of a mixed batch) is not supported; "
                                  "the shadow state runs through every block of one adapter")
    names = list(dict.fromkeys(n for layer in layers for n in layer.active_adapters if n in layer.adapters))
    if len(names) > 1:
        raise ValueError(f"ShadowPEFT requires exactly one active adapter, but got {len(names)} adapters: {names}")
    if not names:
        return None
    mine = [layer for layer in layers if names[0] in layer.adapters]
    return names[0], mine[0].adapters[names[0]], mine[-1]


def _cache_key(kwargs: dict[str, Any]) -> str:
    return "cache" if "cache" in kwargs else "past_key_values"


def _pre_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
    stack = LOCAL.__dict__.setdefault("stack", [])
    stack.append(None)  # replaced by the call's state below; popped by the forward hook, also on error
    found = active(module)
    key = _cache_key(kwargs)
    past = kwargs.get(key)
    if isinstance(past, ShadowCache) or found is not None:
        kwargs = bind_inputs(module, args, kwargs)
        args = ()
    shadow_past = None
    if isinstance(past, ShadowCache):  # the base model only ever sees its own half
        kwargs[key], shadow_past = past.base, past.shadow
    if found is None:
        return args, kwargs
    name, entry, last = found
    if getattr(entry.network, "from_block", False):  # a diffusers transformer: the first block seeds (dit.py)
        if getattr(module, "gradient_checkpointing", False) and module.training and torch.is_grad_enabled():
            raise NotImplementedError(f"ShadowPEFT on {type(module).__name__}: gradient checkpointing is not supported "
                                      "(the recomputed blocks would run without the shadow state); disable it")
        stack[-1] = Call(name, entry, None, None, False, last)
        return args, kwargs
    use_cache = kwargs.get("use_cache")
    if use_cache is None:
        use_cache = bool(getattr(getattr(module, "config", None), "use_cache", False))
    ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
    if ids is None and embeds is None:
        raise ValueError(f"ShadowPEFT: {type(module).__name__} was called without input_ids or inputs_embeds, "
                         "from which the shadow backbone computes its initial state")
    seed, cache = entry.network.seed(module.get_input_embeddings(), ids, embeds, kwargs.get("attention_mask"),
                                     kwargs.get("position_ids"), shadow_past, bool(use_cache))
    stack[-1] = Call(name, entry, seed, cache, bool(use_cache), last)
    return args, kwargs


def _post_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
    call = LOCAL.stack.pop()
    if call is None or output is None:  # no shadow path, or the call raised
        return output
    if call.pack and isinstance(output, dict) and ("cache" in output or "past_key_values" in output):
        key = "cache" if "cache" in output else "past_key_values"
        output[key] = ShadowCache(base=output[key], shadow=call.cache)
    labels = kwargs.get("labels")
    loss = getattr(output, "loss", None) if isinstance(output, dict) else None
    object.__setattr__(module, "last_shadow_loss", None)
    if labels is None or loss is None:
        return output
    shadow_loss = auxiliary_loss(module, call, labels, kwargs.get("attention_mask"))
    if shadow_loss is None:
        return output
    object.__setattr__(module, "last_shadow_loss", shadow_loss.detach())
    output.shadow_loss = shadow_loss.detach()
    weight = call.entry.config.auxiliary_loss_weight
    if weight > 0:
        output.loss = loss + weight * shadow_loss
    return output


def auxiliary_loss(model: nn.Module, call: Call, labels: Tensor, attention_mask: Tensor | None) -> Tensor | None:
    """Eq. 8-9: the shadow path's task loss on ``s^(0)`` (unweighted)."""
    network = call.entry.network
    if network.head_is_lm:
        return SF.shifted_lm_loss(model.get_output_embeddings()(call.seed), labels)
    if network.head is None:
        return None
    return SF.sequence_classification_loss(network.head(SF.pool_last_token(call.seed, attention_mask)), labels)


def install(model: nn.Module) -> None:
    """The two hooks on ``model`` and ``unload_shadow`` bound onto it (idempotent)."""
    if getattr(model, _KEY, None) is not None:
        return
    handles = [model.register_forward_pre_hook(_pre_hook, with_kwargs=True),
               model.register_forward_hook(_post_hook, with_kwargs=True, always_call=True)]
    object.__setattr__(model, _KEY, handles)
    if "unload_shadow" not in vars(model):
        object.__setattr__(model, "unload_shadow", functools.partial(unload_shadow, model))


def uninstall(model: nn.Module) -> None:
    for handle in getattr(model, _KEY, None) or ():
        handle.remove()
    for name in (_KEY, "unload_shadow", "last_shadow_loss"):
        if name in vars(model):
            object.__delattr__(model, name)

