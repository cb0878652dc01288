"""What adapter methods' layers and kernels share: a base layer's shape and weight layout, the dtype of a new
adapter's tensors, whether a fused path would skip a hook, and a reusable scratch buffer."""

from __future__ import annotations

import math
import threading

import torch
from torch import Tensor, nn

from .targeting import Conv1D

# GPT-2's Conv1D as a tuple to add to a method's layer types (empty without transformers)
CONV1D_TYPES: tuple[type, ...] = (Conv1D,) if isinstance(Conv1D, type) else ()
_HALF = (torch.float16, torch.bfloat16)


def is_transposed(base: nn.Module) -> bool:
    """GPT-2's Conv1D stores its weight (d_in, d_out), the transpose of nn.Linear's."""
    return isinstance(base, Conv1D)


def layer_dims(base: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of a base layer: Linear, Conv1D, Conv (channels) or Embedding (dim, num_embeddings)."""
    if isinstance(base, nn.Embedding):
        return base.embedding_dim, base.num_embeddings
    if isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return base.out_channels, base.in_channels
    if isinstance(base, nn.Linear):  # a quantized Linear's packed weight has another shape
        return base.out_features, base.in_features
    w = base.weight
    return (w.shape[1], w.shape[0]) if is_transposed(base) else (w.shape[0], w.shape[1])


def adapter_dtype(base: nn.Module | Tensor | None, *, keep_half: bool = False) -> torch.dtype:
    """The dtype of a new adapter's tensors on ``base`` (a layer, or the tensor that stands for it).

    A float base gives its own dtype; a bitsandbytes 4-/8-bit base (``peftkit.quant``: its packed weight is an
    integer tensor) gives the float dtype it computes in (``compute_dtype``, float32 when it names none); no
    reference tensor gives float32. Half-precision results become float32 (PEFT's ``autocast_adapter_dtype``)
    unless ``keep_half`` (methods whose tensors follow the base's dtype: CLIP's and the prompt methods).
    A module's reference tensor is its ``weight``, or its first parameter when it has none (a whole block).
    """
    if isinstance(base, nn.Module):
        ref = getattr(base, "weight", None)
        if not isinstance(ref, Tensor):
            ref = next(base.parameters(), None)
    else:
        ref = base
    if ref is None:
        dtype = torch.float32
    elif ref.is_floating_point():
        dtype = ref.dtype
    else:  # a quantized base
        dtype = getattr(base, "compute_dtype", None) or torch.float32
    return torch.float32 if dtype in _HALF and not keep_half else dtype


def embed_scale(base: nn.Module) -> Tensor | None:
    """A scaled embedding's factor (Gemma's ``embed_scale``), which its forward multiplies the rows by (adapters
    that add to an embedding's output scale their rows by it too, as peft does); None for a plain embedding."""
    scale = getattr(base, "embed_scale", None)
    if isinstance(scale, (int, float)):
        return torch.tensor(scale, device=base.weight.device, dtype=base.weight.dtype)
    if isinstance(scale, Tensor) and scale.numel() == 1:
        return scale
    return None


def has_hooks(module: nn.Module) -> bool:
    """Whether computing ``module``'s output without calling it (an adapter's ``fused_forward``) would skip a hook."""
    return bool(module._forward_hooks or module._forward_pre_hooks
                or nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)


_scratch = threading.local()


def scratch(shape: tuple[int, ...], like: Tensor) -> Tensor:
    """A reusable per-thread buffer with ``like``'s dtype and device (no fresh allocation per call).

    Layers run one after another, so one buffer serves every layer of a model; its content is valid
    only until the next call. Calls under ``torch.inference_mode()`` get buffers of their own.
    """
    numel = math.prod(shape)
    # a buffer made under torch.inference_mode() is an inference tensor: it may not be written outside it
    key = (like.dtype, like.device, not torch.compiler.is_compiling() and torch.is_inference_mode_enabled())
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = {}
    buf = buffers.get(key)
    if buf is None or buf.numel() < numel:
        buf = buffers[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
    return buf[:numel].view(shape)
