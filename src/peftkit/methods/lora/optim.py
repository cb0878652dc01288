"""LoRA+ (Hayou et al. 2024, arXiv 2402.12354): B learns ``loraplus_lr_ratio`` times faster than A.

Groups and keywords follow Hugging Face PEFT's ``create_loraplus_optimizer``: A (and other matrices) at
``lr``; B and 1-D parameters at ``lr * ratio``; embedding adapters at ``loraplus_lr_embedding``; weight decay
``loraplus_weight_decay`` everywhere except biases and normalisation weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...layers import AdapterLayer

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.RMSNorm)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORMS) or "norm" in type(module).__name__.lower()


def create_loraplus_optimizer(
    model: nn.Module, optimizer_cls: type[torch.optim.Optimizer], *, lr: float, loraplus_lr_ratio: float, **kwargs: Any
) -> torch.optim.Optimizer:
    """An optimizer over the trainable parameters of ``model`` with LoRA+ learning-rate groups."""
    if loraplus_lr_ratio <= 0:
        raise ValueError(f"loraplus_lr_ratio: expected > 0, got {loraplus_lr_ratio}")
    weight_decay = kwargs.pop("loraplus_weight_decay", 0.0)
    lr_embedding = kwargs.pop("loraplus_lr_embedding", 1e-6)
    role: dict[int, str] = {}  # parameter id -> "A" | "B" | "embedding"
    for layer in model.modules():
        if isinstance(layer, AdapterLayer):
            for adapter in layer.adapters.values():
                for name, p in adapter.named_parameters():
                    if getattr(adapter, "kind", None) == "embedding" and name in ("lora_A", "lora_B"):
                        role[id(p)] = "embedding"
                    else:
                        role[id(p)] = "B" if name == "lora_B" else "A"
    no_decay = {
        id(p) for m in model.modules() for n, p in m.named_parameters(recurse=False) if n == "bias" or _is_norm(m)
    }
    groups: dict[str, list[nn.Parameter]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        kind = role.get(id(p), "A")
        if kind == "B" or (kind == "A" and p.dim() == 1):
            kind = "B_no_decay" if id(p) in no_decay else "B"
        groups[kind].append(p)
    param_groups = [
        {"params": groups["A"], "weight_decay": weight_decay, "lr": lr},
        {"params": groups["embedding"], "weight_decay": weight_decay, "lr": lr_embedding},
        {"params": groups["B"], "weight_decay": weight_decay, "lr": lr * loraplus_lr_ratio},
        {"params": groups["B_no_decay"], "weight_decay": 0.0, "lr": lr * loraplus_lr_ratio},
    ]
    # all four groups, empty ones too, in PEFT's order (a scheduler or a script may index them)
    optimizer = optimizer_cls(param_groups, lr=lr, **kwargs)
    if optimizer_cls.__name__ in ("Adam8bit", "AdamW8bit", "PagedAdam8bit", "PagedAdamW8bit"):
        import bitsandbytes  # only with a bitsandbytes optimizer: embeddings keep 32-bit states, as in PEFT

        manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})
    return optimizer
