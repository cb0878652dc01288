"""Key/value prefixes for prompt methods (prefix tuning, P-tuning v2, hybrid prefixes): the call's cache.

``prefix_kv`` gives a call a ``transformers`` Cache pre-filled with the prefix and extends the attention mask.
Under activation checkpointing the prefix goes in a read-only cache (``update`` returns ``[prefix; new]``
without storing) that checkpointed layers may keep, and ``hold_in_layers`` hands it, for the one call, to
every layer, including those a backbone passes no cache under checkpointing (GPT-2's); the model's forward
hook (``hook.install``) releases them when the call returns.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import Tensor, nn

from ...module_index import modules_where
from .inputs import CACHE_KEYS, batch_size, cache_length, is_encoder_decoder, pop_cache, prepend_ones


def prefix_cache(model: nn.Module, cache: Any, layers: list[tuple[Tensor, Tensor]]) -> Any:
    """A cache holding the prefix keys/values (per layer, (batch, heads, n, head_dim)); an empty cache given by
    the caller (``generate``) is filled in place so the caller keeps its object."""
    from transformers import DynamicCache, EncoderDecoderCache  # late: not loaded at import peftkit

    if cache is None:
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache()) if is_encoder_decoder(model) else DynamicCache()
    target = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
    for i, (k, v) in enumerate(layers):
        target.update(k, v, i)
    return cache


def model_layers(model: nn.Module) -> list[nn.Module]:
    """The model's transformer layers that ``transformers`` may checkpoint (its ``GradientCheckpointingLayer`` s);
    asked on every call of a prefix method, so kept between calls (``module_index``)."""
    return modules_where(model, "checkpointable", lambda m: hasattr(type(m), "_can_checkpoint_with_cache"))


def checkpointing_layers(model: nn.Module) -> list[nn.Module]:
    """The layers with activation checkpointing on, when ``model`` is training (they checkpoint when autograd is on)."""
    if not model.training:
        return []
    return [m for m in model_layers(model) if getattr(m, "gradient_checkpointing", False) is True]


@functools.lru_cache(maxsize=None)
def _read_only_cache_types() -> tuple[type, type, type]:
    from transformers import DynamicCache  # late: not loaded at import peftkit

    class PrefixCache(DynamicCache):
        """Holds the prefix; ``update`` returns ``[prefix; new]`` without storing."""

        def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kw: Any):
            layer = self.layers[layer_idx]
            return (torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2))

    class PassThroughCache(DynamicCache):
        """Cross-attention: keys/values computed from the encoder output on every run, never stored."""

        def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kw: Any):
            return key_states, value_states

    class NeverUpdated(dict):
        """``EncoderDecoderCache.is_updated`` that stays empty: the decoder never reads stored cross keys/values."""

        def __setitem__(self, key: Any, value: Any) -> None:
            pass

    return PrefixCache, PassThroughCache, NeverUpdated


def read_only_prefix_cache(model: nn.Module, layers: list[tuple[Tensor, Tensor]]) -> Any:
    """A cache that holds the prefix and never grows: ``update`` returns ``[prefix; new]`` without storing (on an
    encoder-decoder model: as its self-attention part, with a cross-attention part that stores nothing).

    Activation-checkpointed layers drop a cache they could write to (the backward replay would write twice, and
    would read cross-attention keys/values the first run stored); this one they may keep
    (``_can_checkpoint_with_cache``): the replay computes what the first run did."""
    from transformers import DynamicCache, EncoderDecoderCache  # late: not loaded at import peftkit

    prefix_cls, cross_cls, never_updated = _read_only_cache_types()
    cache = prefix_cls()
    for i, (k, v) in enumerate(layers):
        DynamicCache.update(cache, k, v, i)
    if not is_encoder_decoder(model):
        return cache
    both = EncoderDecoderCache(cache, cross_cls())
    both.is_updated = never_updated()
    return both


def hold_in_layers(model: nn.Module, cache: Any, keep: bool) -> None:
    """For this call (undone by ``release_layers`` when it returns), make the layers of a training ``model`` with
    activation checkpointing on run with ``cache``.

    - ``keep`` (``cache`` is a read-only prefix cache): a checkpointed layer keeps it (``_can_checkpoint_with_cache``;
      ``transformers`` drops the cache of a checkpointed layer otherwise).
    - On a decoder-only model, a layer its backbone hands no cache gets this one: GPT-2's backbone withholds the
      cache from all its blocks when checkpointing is on in training mode (autograd on or off), while its causal
      mask still counts the cached prefix (a mask / key length mismatch). On an encoder-decoder model the backbone
      routes the cache to the decoder's layers itself; its encoder layers must not see the prefix."""
    release_layers(model)
    undo: list[Any] = []
    decoder_only = not is_encoder_decoder(model)
    for layer in model_layers(model):
        if keep and getattr(layer, "gradient_checkpointing", False) is True:
            undo.append(_set_instance_attr(layer, "_can_checkpoint_with_cache", True))
        hook = _cache_filler(layer, cache) if decoder_only else None
        if hook is not None:
            undo.append(layer.register_forward_pre_hook(hook, with_kwargs=True).remove)
    model.__dict__["_peftkit_release"] = undo


def release_layers(model: nn.Module) -> None:
    """Undo ``hold_in_layers`` (no-op when nothing is held)."""
    if "_peftkit_release" in model.__dict__:
        for undo in reversed(model.__dict__.pop("_peftkit_release")):
            undo()


def _set_instance_attr(module: nn.Module, name: str, value: Any) -> Any:
    """Set ``module.name`` on the instance; returns the undo."""
    missing = object()
    old = module.__dict__.get(name, missing)
    module.__dict__[name] = value

    def undo() -> None:
        if old is missing:
            module.__dict__.pop(name, None)
        else:
            module.__dict__[name] = old

    return undo


@functools.lru_cache(maxsize=None)
def _cache_parameter(layer_type: type) -> tuple[str | None, int | None]:
    """The name of a layer type's cache parameter (None: it takes none) and its position (None: keyword-only)."""
    params = list(inspect.signature(layer_type.forward).parameters.values())[1:]  # without self
    key = next((k for k in CACHE_KEYS if any(p.name == k for p in params)), None)
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return key, positional.index(key) if key in positional else None


def _cache_filler(layer: nn.Module, cache: Any) -> Any:
    """A forward pre-hook (with kwargs) giving ``layer`` ``cache`` where its caller passed none (None when the
    layer takes no cache)."""
    key, index = _cache_parameter(type(layer))
    if key is None:
        return None

    def fill(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        if index is not None and index < len(args):  # GPT-2 passes its blocks the cache positionally
            if args[index] is not None:
                return None
            return (*args[:index], cache, *args[index + 1:]), kwargs
        if any(kwargs.get(k) is not None for k in CACHE_KEYS):
            return None
        kwargs[key] = cache
        return args, kwargs

    return fill


def prefix_kv(model: nn.Module, kwargs: dict[str, Any], n: int, make_layers: Any) -> dict[str, Any]:
    """Give the call a KV prefix of length ``n`` (``make_layers(batch, separate=False)`` builds it; ``separate``:
    each layer's keys/values from a graph of their own, as reentrant checkpointing backpropagates per layer),
    extending the mask. Under activation checkpointing the prefix goes in a read-only cache, and the model's layers
    are made to run with the call's cache (``hold_in_layers``)."""
    cache = pop_cache(kwargs)
    checkpointing = checkpointing_layers(model)
    read_only = cache is None and bool(checkpointing) and torch.is_grad_enabled()
    if read_only:
        cache = read_only_prefix_cache(model, make_layers(batch_size(kwargs), separate=True))
    elif cache_length(cache) == 0:
        cache = prefix_cache(model, cache, make_layers(batch_size(kwargs)))
    if checkpointing and (read_only or not torch.is_grad_enabled()):  # a cache written to can't cross a checkpoint
        hold_in_layers(model, cache, keep=read_only)
    kwargs["cache"] = cache
    if is_encoder_decoder(model):
        kwargs["decoder_attention_mask"] = prepend_ones(kwargs.get("decoder_attention_mask"), n)
        if kwargs.get("decoder_position_ids") is not None:
            kwargs["decoder_position_ids"] = kwargs["decoder_position_ids"] + n
        return kwargs
    kwargs["attention_mask"] = prepend_ones(kwargs.get("attention_mask"), n)
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = kwargs["position_ids"] + n
    return kwargs
