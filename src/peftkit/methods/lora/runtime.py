"""``LoraConfig.runtime_config`` (``LoraRuntimeConfig``): options of this process, never saved in the adapter file.

``ephemeral_gpu_offload``: an adapter whose factors are kept in CPU memory computes DoRA's initial magnitude
``||W0 + s B A||`` on the accelerator (CUDA, else XPU) and keeps the result on the CPU, as peft's
``DoraLinearVariant.init`` (its ``place_on_cpu``): the base weight and the factors are copied over for that one
computation, nothing of the model moves. Without a CUDA / XPU device it is refused (peft fails there too). An
adapter already on an accelerator, one that is not DoRA, or a quantized base is unaffected (computed where it is).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


def _accelerator() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return torch.device("xpu")
    raise ValueError("LoraConfig.runtime_config.ephemeral_gpu_offload=True: it computes DoRA's initialisation on a "
                     "CUDA or XPU device, and none is available; set it to False")


def offloaded(config: Any, adapter: nn.Module, base: nn.Module, full_norm: Callable[[nn.Module], Tensor]) -> Tensor:
    """``full_norm(base)``, on the accelerator when ``ephemeral_gpu_offload`` asks for it and the adapter's
    factors are on the CPU; the result on the factors' device."""
    runtime = getattr(config, "runtime_config", None)
    A, B = adapter.lora_A, adapter.lora_B
    if not getattr(runtime, "ephemeral_gpu_offload", False) or "cpu" not in (A.device.type, B.device.type) \
            or A.is_meta or not base.weight.is_floating_point():  # a quantized base: where it is
        return full_norm(base)
    device = _accelerator()
    swapped = [(adapter, "lora_A"), (adapter, "lora_B"), (base, "weight")]
    saved = [(m, n, m._parameters[n]) for m, n in swapped]
    try:
        for module, name, param in saved:  # the copies for this computation only
            module._parameters[name] = nn.Parameter(param.detach().to(device), requires_grad=False)
        norm = full_norm(base)
    finally:
        for module, name, param in saved:
            module._parameters[name] = param
        adapter._cache.clear()  # nothing computed on the copies stays
    return norm.to(A.device)
