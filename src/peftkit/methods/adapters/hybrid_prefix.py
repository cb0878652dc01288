"""The prefix side of a hybrid adapter: the prompt mixin that lets the engine's prompt hook find a hybrid's
prefix part (``PromptPart``; hybrid.py mixes it into its adapter classes), and UniPELT's prefix gate
plumbing: where the gates sit (one per attention
layer, on its query projection: ``prefix_gate_hosts``) and the call's ungated prefix entries they scale
(``PrefixStash``). The gate itself is ``HybridAdapter.gate_prefix`` (hybrid.py).
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor, nn

from ..prompt.hook import PromptAdapter
from ..prompt.inputs import cache_length, is_encoder_decoder, pop_cache
from ...targeting import NotApplicableError, TargetError, role_paths


class PrefixStash:
    """A gated prefix's cache entries of the current call: layer index -> (cache layer, ungated keys, values),
    filled by the prefix part when the call built a fresh prefix, read by the gates on the query projections."""

    def __init__(self) -> None:
        self.layers: dict[int, tuple[Any, Tensor, Tensor]] = {}


_CROSS_ATTENTION = re.compile(r"cross|encdec|encoder_attn", re.IGNORECASE)


def prefix_gate_hosts(model: nn.Module, named: list[tuple[str, nn.Module]]) -> dict[str, int]:
    """Query projection path -> index of its attention layer in the prefix cache: every self-attention layer,
    the decoder's only on an encoder-decoder model (where the prefix is)."""
    paths = role_paths(model, named, "query") or role_paths(model, named, "qkv")
    modules = dict(named)
    if is_encoder_decoder(model):
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        prefix = next((n + "." for n, m in named if m is decoder), None)
        paths = [p for p in paths if prefix and p.startswith(prefix) and not _CROSS_ATTENTION.search(p)]
    hosts = {}
    for p in paths:
        idx = getattr(modules.get(p.rpartition(".")[0]), "layer_idx", None)
        if not isinstance(idx, int):
            found = re.search(r"\.(\d+)\.", p)
            idx = int(found.group(1)) if found else None
        if idx is None:
            raise TargetError(f"prefix gate: no attention layer index for {p!r}")
        hosts[p] = idx
    if not hosts:
        raise NotApplicableError(f"the prefix gate sits on the attention query projections, and {type(model).__name__} "
                                 "has none in peftkit's role table; set gated=False or drop the prefix part")
    return hosts


class PromptPart(PromptAdapter):
    """Mixed into a hybrid's adapter on the input embedding when it has a prompt part, so that the engine's
    prompt hook (``methods.prompt.hook.active_prompt``) finds it and the checkpoint reads its file tensors.

    It comes after the hybrid adapter class in the bases (``class XWithPrompt(XAdapter, PromptPart)``), so the
    hybrid's own methods (``forward``, the hooks) win over ``PromptAdapter``'s; this class adds ``rewrite`` and
    ``file_tensors``."""

    def _prompt(self) -> PromptAdapter:
        return next(p for p in self.parts.values() if isinstance(p, PromptAdapter))

    def rewrite(self, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        stash = self.prefix_stash
        if stash is None:
            return self._prompt().rewrite(model, kwargs)
        fresh = cache_length(pop_cache(dict(kwargs))) == 0  # the prefix part builds a new prefix cache
        kwargs = self._prompt().rewrite(model, kwargs)
        stash.layers = {}
        if fresh:  # the gates on the query projections scale these entries (HybridAdapter.gate_prefix)
            cache = kwargs["cache"]
            cache = getattr(cache, "self_attention_cache", cache)
            stash.layers = {i: (layer, layer.keys, layer.values) for i, layer in enumerate(cache.layers)}
        return kwargs

    def file_tensors(self, for_save: bool) -> dict[str, Tensor]:
        name = next(n for n, p in self.parts.items() if isinstance(p, PromptAdapter))
        return {f"{name}.{k}": v for k, v in self._prompt().file_tensors(for_save).items()}
