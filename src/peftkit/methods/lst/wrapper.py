"""``LSTLayer``: the wrapper of the block stack, and the hooks on its blocks that feed the side network.

LST rides a *block stack*, one of two layouts (``stack_layout``):

- ``"encoder"`` (BERT, RoBERTa): a module ``encoder`` holding the ModuleList ``layer``, called with ``h_0`` (the
  embedding output) as its first argument and returning ``h_N``. The wrapped encoder runs whole under
  ``torch.no_grad``; the side network's up-projected state is added to its output afterwards.
- ``"model"`` (ViT in transformers 5: ``ViTModel`` holds its ModuleList ``layers`` itself, between the patch
  embeddings and the final LayerNorm): ``h_0`` is the first block's input. Autograd is off from the first block's
  start to the last block's end only, and the last block's output is replaced by ``h_N + U s_N``: what the model
  runs after its blocks (ViT's final LayerNorm, then the task head outside) runs with autograd on the adapted state.

Either way autograd builds no graph inside the blocks and keeps none of their activations (the paper's memory
point; backpropagation stays in the side network). While the stack runs, forward hooks on its blocks (installed by
``LSTAdapter.install_model_hooks``) append each block's output ``h_i`` to the call's record, kept on a
thread-local stack (request threads share layers). The attention mask the side blocks get is the argument named
``attention_mask`` (bound by name, never by position: a head mask is no attention mask); ViT passes none unless
the caller gives one. Several active LST adapters each add their own side state. Outside an LST call (adapters
disabled, none active) the stack runs as it is, with autograd as usual.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ...layers import AdapterLayer

LOCAL = threading.local()


def stack_layout(module: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """(layout, blocks) of a block stack: ``"encoder"`` (its ModuleList ``layer``) or ``"model"`` (an image model,
    main input ``pixel_values``, holding its ModuleList ``layers``); None for any other module."""
    blocks = getattr(module, "layer", None)
    if isinstance(blocks, nn.ModuleList) and len(blocks):
        return "encoder", blocks
    blocks = getattr(module, "layers", None)
    if getattr(module, "main_input_name", None) == "pixel_values" and isinstance(blocks, nn.ModuleList) and len(blocks):
        return "model", blocks
    return None


def layout_of(module: nn.Module) -> tuple[str, nn.ModuleList]:
    found = stack_layout(module)
    if found is None:
        raise TypeError(f"LST: {type(module).__name__} holds no block stack (a ModuleList 'layer', or 'layers' in an "
                        "image model)")
    return found


def blocks_of(module: nn.Module) -> nn.ModuleList:
    return layout_of(module)[1]


def named_arg(fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any], name: str) -> Any:
    """The argument ``name`` of a call of ``fn`` (None when ``fn`` has no such parameter or the call omits it)."""
    try:
        bound = inspect.signature(fn).bind_partial(*args, **kwargs).arguments
    except TypeError:
        return kwargs.get(name)
    return bound.get(name)


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


class Call:
    """One LST call of a block stack: its blocks, the record ``h_1 .. h_N``, and (``"model"`` layout) ``h_0``, the
    mask, the grad mode to restore and ``finish`` (the last block's output -> the adapted one)."""

    def __init__(self, blocks: nn.ModuleList, finish: Callable[[Any], Any] | None = None) -> None:
        self.ids = {id(b) for b in blocks}
        self.first, self.last = id(blocks[0]), id(blocks[-1])
        self.record: list[Tensor] = []
        self.finish = finish
        self.h0: Tensor | None = None
        self.mask: Any = None
        self.grad = torch.is_grad_enabled()
        self.finished = False


def _call_of(module: nn.Module) -> Call | None:
    stack = getattr(LOCAL, "stack", None)
    return stack[-1] if stack and id(module) in stack[-1].ids else None


def enter_block(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
    """Forward pre-hook on each block (``"model"`` layout, first block): keep ``h_0`` and the mask, autograd off."""
    call = _call_of(module)
    if call is not None and call.finish is not None and id(module) == call.first:
        call.h0 = args[0] if args else kwargs["hidden_states"]
        call.mask = named_arg(module.forward, args, kwargs, "attention_mask")
        call.grad = torch.is_grad_enabled()
        torch.set_grad_enabled(False)


def record_block(module: nn.Module, args: tuple, output: Any) -> Any:
    """Forward hook on each block: the output joins the record of the LST call running this block; in the
    ``"model"`` layout the last block's output is replaced by the adapted state, computed with autograd back on."""
    call = _call_of(module)
    if call is None:
        return None
    call.record.append(hidden_of(output))
    if call.finish is None or id(module) != call.last:
        return None
    torch.set_grad_enabled(call.grad)
    call.finished = True
    return call.finish(output)


def install(stack: nn.Module) -> None:
    for block in blocks_of(stack):
        if record_block not in block._forward_hooks.values():
            block.register_forward_hook(record_block)
        if enter_block not in block._forward_pre_hooks.values():
            block.register_forward_pre_hook(enter_block, with_kwargs=True)


def uninstall(model: nn.Module) -> None:
    for module in model.modules():
        for key in [k for k, fn in module._forward_hooks.items() if fn is record_block]:
            del module._forward_hooks[key]
        for key in [k for k, fn in module._forward_pre_hooks.items() if fn is enter_block]:
            del module._forward_pre_hooks[key]
            module._forward_pre_hooks_with_kwargs.pop(key, None)


class LSTLayer(AdapterLayer):
    """The block stack with LST adapters: a frozen, graph-free backbone pass plus each active side network."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        names = [] if self.disable_adapters else [n for n in self.active_adapters if n in self.adapters]
        if not names:
            return self.base_layer(*args, **kwargs)
        if self.routing is not None:
            raise ValueError("LST: adapter_names (per-row routing of a mixed batch) is not supported; the side "
                             "network reads the whole encoder")
        layout, blocks = layout_of(self.base_layer)
        if layout == "model":
            return self._model_layout(names, blocks, args, kwargs)
        h0 = args[0] if args else kwargs["hidden_states"]
        mask = named_arg(self.base_layer.forward, args, kwargs, "attention_mask")
        call = Call(blocks)
        out = self._run(call, args, kwargs, grad=False)
        h = hidden_of(out)
        y = h
        for name in names:
            y = y + self.adapters[name].side(h0, call.record, mask).to(h.dtype)
        return replace_hidden(out, y)

    def _model_layout(self, names: list[str], blocks: nn.ModuleList, args: tuple, kwargs: dict[str, Any]) -> Any:
        def finish(out: Any) -> Any:
            h = hidden_of(out)
            y = h
            for name in names:
                y = y + self.adapters[name].side(call.h0, call.record, call.mask).to(h.dtype)
            return replace_hidden(out, y)

        call = Call(blocks, finish)
        out = self._run(call, args, kwargs, grad=True)
        if not call.finished:
            raise RuntimeError(f"LST: the last of {type(self.base_layer).__name__}'s {len(blocks)} blocks did not run "
                               "through the LST hooks (add LST adapters through get_peft_model / load_adapter)")
        return out

    def _run(self, call: Call, args: tuple, kwargs: dict[str, Any], grad: bool) -> Any:
        stack = LOCAL.__dict__.setdefault("stack", [])
        stack.append(call)
        saved = torch.is_grad_enabled()
        try:
            with torch.set_grad_enabled(saved and grad):
                out = self.base_layer(*args, **kwargs)
        finally:
            stack.pop()
            torch.set_grad_enabled(saved)
        if len(call.record) != len(call.ids):
            raise RuntimeError(f"LST: recorded {len(call.record)} of the encoder's {len(call.ids)} block outputs (the "
                               "model hooks are missing: add LST adapters through get_peft_model / load_adapter)")
        return out
