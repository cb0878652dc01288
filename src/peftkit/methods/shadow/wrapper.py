"""``ShadowLayer``: the wrapper of one decoder block, and the per-call shadow state it reads.

A block wrapped for the call's adapter takes the running shadow state ``s^(l-1)`` of the call (opened by the
model's pre-hook, ``hook.py``), runs the block on the injected input ``h + alpha * W_up W_down (h - s)`` and
advances the state from the block's output by the gated update. The state lives in a thread-local stack,
never on the layer (request threads share layers), so the decoder loop between blocks sees plain tensors (peft
passes a ``ShadowCarrier`` object through it instead: the outputs are the same). Outside a shadow call (adapters
disabled, another adapter active, the block not adapted) the block runs as it is.
"""

from __future__ import annotations

import threading
from typing import Any

from torch import Tensor

from ...layers import AdapterLayer
from .dit import IMAGE_STREAM, image_stream

LOCAL = threading.local()


class Call:
    """One call's shadow state: the adapter's name, its entry adapter (which holds the network), ``s^(0)``,
    the running ``s^(l)``, the backbone's cache, whether to pack a ``ShadowCache`` (``seed`` None: computed by
    the entry block from its input, for diffusers transformers) and the last wrapped block, whose update
    ``s^(L)`` nothing reads: it is not computed (peft computes and drops it; skipping it frees its graph early
    and saves the work, with the same outputs and gradients)."""

    def __init__(self, name: str, entry: Any, seed: Tensor | None, cache: Any, pack: bool, last: Any = None) -> None:
        self.name, self.entry, self.seed, self.state, self.cache, self.pack = name, entry, seed, seed, cache, pack
        self.last = last
        self.deferred = seed is None  # a diffusers transformer: the entry block computes s^(0) from its input


def current() -> Call | None:
    stack = getattr(LOCAL, "stack", None)
    return stack[-1] if stack else None


def block_hidden(out: Any, stream: int | None = 0) -> Tensor:
    """The hidden states in a block's return value (a tensor, a tuple, or an output with ``hidden_states``). In a tuple
    they are at ``stream``: 0 for a decoder block; for a diffusers two-stream block, the image stream's position
    (``dit.IMAGE_STREAM``: 1 in SD3's and Flux's ``(encoder_hidden_states, hidden_states)``; peft reads the first, the
    text stream); None: a diffusers block whose tuple layout is not known, refused."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, tuple):
        if stream is None:
            raise TypeError("ShadowPEFT: a diffusers block returned a tuple whose image stream is not known (known: "
                            f"{', '.join(IMAGE_STREAM)}); the shadow state cannot be advanced")
        return out[stream]
    for attr in ("hidden_states", "last_hidden_state"):
        if getattr(out, attr, None) is not None:
            return getattr(out, attr)
    raise TypeError(f"ShadowPEFT: unsupported decoder block output {type(out).__name__}; expected a Tensor or a tuple")


class ShadowLayer(AdapterLayer):
    """A decoder block with shadow adapters (peft's ``ShadowLayer``)."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        call = current()
        if (call is None or self.disable_adapters or call.name not in self.adapters
                or call.name not in self.active_adapters):
            return self.base_layer(*args, **kwargs)
        adapter = self.adapters[call.name]
        if call.deferred and (call.state is None or adapter.network is not None):
            if adapter.network is None:  # a diffusers transformer's block before the seeding one: runs as it is
                return self.base_layer(*args, **kwargs)
            h = args[0] if args else kwargs["hidden_states"]
            rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            call.seed = call.state = adapter.network.seed_block(h, args[1:], rest)
        if args:
            h = args[0]
            out = self.base_layer(adapter.inject(h, call.state), *args[1:], **kwargs)
        else:
            h = kwargs.pop("hidden_states")
            out = self.base_layer(hidden_states=adapter.inject(h, call.state), **kwargs)
        # s^(L) after the last block is read by nothing: not computed, and s^(L-1) is let go at once
        if self is call.last:
            call.state = None
        else:  # a diffusers block's state is advanced from its image stream
            stream = image_stream(self.base_layer) if call.deferred else 0
            call.state = adapter.update(block_hidden(out, stream), call.state)
        return out
