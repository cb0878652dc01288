"""The visual prompt of LLaMA-Adapter V2's early fusion: the call's projected image features, pooled.

A forward hook on the visual module (LLaVA's ``multi_modal_projector``, output (images, patches, d)) keeps
``v = mean over patches`` (images, d) in the model's ``VisualStash``; the early layers' prompt adapters read it.
A forward pre-hook on the model clears it when a call starts a new sequence (no cache, or an empty one), so a
text-only call after an image call sees no image, while ``generate``'s cached steps (the projector runs in the
first step only) keep the first step's. The stash is per thread (concurrent calls from request threads each see
their own image), holds no module and is never saved; a deep copy of the model gets an empty one.
"""

from __future__ import annotations

import threading
from typing import Any

from torch import Tensor, nn

from ..prompt.inputs import CACHE_KEYS, bind_inputs

STASH = "_peftkit_llama_adapter_v2_visual"  # the stash's attribute on the model and on the visual module
_HANDLES = "_peftkit_llama_adapter_v2_hooks"  # the hook handles' attribute on the model


class VisualStash:
    """The current call's visual prompt (images, d) or None, per thread."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self) -> Tensor | None:
        return getattr(self._local, "value", None)

    def set(self, value: Tensor | None) -> None:
        self._local.value = value

    def __deepcopy__(self, memo: dict) -> "VisualStash":
        return VisualStash()  # per call, never copied (memo: every reference in the copy gets this one)

    def __reduce__(self) -> tuple:
        return VisualStash, ()


def stash_of(model: nn.Module) -> VisualStash:
    """The model's stash, made on first use."""
    stash = model.__dict__.get(STASH)
    if stash is None:
        stash = VisualStash()
        model.__dict__[STASH] = stash
    return stash


def pool(features: Tensor) -> Tensor:
    """The visual prompt: the projected patch features (images, patches, d) averaged over the patches -> (images, d)."""
    return features.mean(dim=-2) if features.dim() == 3 else features.mean(dim=-2, keepdim=True)


def _keep(module: nn.Module, args: tuple, output: Any) -> None:
    features = output if isinstance(output, Tensor) else output[0]
    module.__dict__[STASH].set(pool(features))


def _clear_on_new_sequence(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
    call = bind_inputs(module, args, kwargs)
    cache = next((call[k] for k in CACHE_KEYS if call.get(k) is not None), None)
    if cache is None or (hasattr(cache, "get_seq_length") and cache.get_seq_length() == 0):
        module.__dict__[STASH].set(None)


def install(model: nn.Module, visual_paths: list[str]) -> None:
    """Hooks on ``model`` and on each of ``visual_paths`` (idempotent; a module put at a path since, e.g. a
    ``ModulesToSaveWrapper`` around the projector, gets its own hook)."""
    stash = stash_of(model)
    handles: dict[int, Any] = model.__dict__.setdefault(_HANDLES, {})
    targets = [(model, True)] + [(model.get_submodule(p), False) for p in visual_paths]
    for module, is_model in targets:
        if id(module) in handles:
            continue
        module.__dict__[STASH] = stash
        handles[id(module)] = (module.register_forward_pre_hook(_clear_on_new_sequence, with_kwargs=True)
                               if is_model else module.register_forward_hook(_keep))


def uninstall(model: nn.Module) -> None:
    for handle in model.__dict__.pop(_HANDLES, {}).values():
        handle.remove()
    for module in model.modules():
        module.__dict__.pop(STASH, None)
