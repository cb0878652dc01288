"""``LSTLayer``: the wrapper of the encoder, and the block-output recorder the model hooks feed.

An encoder wrapped for an active LST adapter runs under ``torch.no_grad``: autograd builds no graph inside the
backbone and keeps none of its activations (the paper's memory point; backpropagation stays in the side
network). While it runs, a forward hook on each of its blocks (installed by ``LSTAdapter.install_model_hooks``)
appends the block's output ``h_i`` to the call's record, a thread-local stack (request threads share layers).
The side network then reads ``h_0`` (the encoder's input) and the record, and its up-projected state is added
to the encoder's last hidden state; several active LST adapters each add their own. Outside an LST call
(adapters disabled, none active) the encoder runs as it is, with autograd as usual.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import Tensor, nn

from ...layers import AdapterLayer

LOCAL = threading.local()


def hidden_of(out: Any) -> Tensor:
    """The hidden states in a block's or encoder's return value (a tensor, a tuple or a ``ModelOutput``)."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, tuple):
        return out[0]
    state = getattr(out, "last_hidden_state", None)
    if state is None:
        raise TypeError(f"LST: unsupported block / encoder output {type(out).__name__}; expected a Tensor, a tuple "
                        "or an output with last_hidden_state")
    return state


def replace_hidden(out: Any, new: Tensor) -> Any:
    if isinstance(out, Tensor):
        return new
    if isinstance(out, tuple):
        return (new, *out[1:])
    out.last_hidden_state = new  # a ModelOutput keeps its dict entry in step
    return out


def record_block(module: nn.Module, args: tuple, output: Any) -> None:
    """Forward hook on each encoder block: the output joins the record of the LST call running this block."""
    stack = getattr(LOCAL, "stack", None)
    if stack and id(module) in stack[-1][0]:
        stack[-1][1].append(hidden_of(output))


def install(encoder: nn.Module) -> None:
    for block in encoder.layer:
        if record_block not in block._forward_hooks.values():
            block.register_forward_hook(record_block)


def uninstall(model: nn.Module) -> None:
    for module in model.modules():
        for key in [k for k, fn in module._forward_hooks.items() if fn is record_block]:
            del module._forward_hooks[key]


class LSTLayer(AdapterLayer):
    """The encoder with LST adapters: a frozen, graph-free backbone pass plus each active side network."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        names = [] if self.disable_adapters else [n for n in self.active_adapters if n in self.adapters]
        if not names:
            return self.base_layer(*args, **kwargs)
        if self.routing is not None:
            raise ValueError("LST: adapter_names (per-row routing of a mixed batch) is not supported; the side "
                             "network reads the whole encoder")
        h0 = args[0] if args else kwargs["hidden_states"]
        mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
        blocks = self.base_layer.layer
        record: list[Tensor] = []
        stack = LOCAL.__dict__.setdefault("stack", [])
        stack.append(({id(b) for b in blocks}, record))
        try:
            with torch.no_grad():
                out = self.base_layer(*args, **kwargs)
        finally:
            stack.pop()
        if len(record) != len(blocks):
            raise RuntimeError(f"LST: recorded {len(record)} of the encoder's {len(blocks)} block outputs (the model "
                               "hooks are missing: add LST adapters through get_peft_model / load_adapter)")
        h = hidden_of(out)
        y = h
        for name in names:
            y = y + self.adapters[name].side(h0, record, mask).to(h.dtype)
        return replace_hidden(out, y)
