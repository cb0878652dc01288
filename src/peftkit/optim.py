"""LoRA+ (Hayou et al. 2024, arXiv 2402.12354): B learns ``loraplus_lr_ratio`` times faster than A."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .layers import AdapterLayer


def create_loraplus_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer],
    *,
    lr: float,
    loraplus_lr_ratio: float,
    loraplus_lr_embedding: float = 1e-6,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """An optimizer with parameter groups: A and other trainables at ``lr``, B at ``lr * ratio``,
    embedding adapters at ``loraplus_lr_embedding``; 1-D parameters get no weight decay."""
    if loraplus_lr_ratio <= 0:
        raise ValueError(f"loraplus_lr_ratio: expected > 0, got {loraplus_lr_ratio}")
    weight_decay = kwargs.pop("weight_decay", 0.0)
    groups: dict[str, list[nn.Parameter]] = {"A": [], "B": [], "embedding": [], "no_decay": []}
    seen: set[int] = set()
    for layer in model.modules():
        if not isinstance(layer, AdapterLayer):
            continue
        for adapter in layer.adapters.values():
            for name, p in adapter.named_parameters():
                if not p.requires_grad:
                    continue
                seen.add(id(p))
                if getattr(adapter, "kind", None) == "embedding" and name in ("lora_A", "lora_B"):
                    groups["embedding"].append(p)
                elif name == "lora_B":
                    groups["B"].append(p)
                elif p.dim() == 1 or name == "magnitude":
                    groups["no_decay"].append(p)
                else:
                    groups["A"].append(p)
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            groups["no_decay" if p.dim() == 1 else "A"].append(p)
    param_groups = [
        {"params": groups["A"], "lr": lr, "weight_decay": weight_decay},
        {"params": groups["embedding"], "lr": loraplus_lr_embedding, "weight_decay": weight_decay},
        {"params": groups["B"], "lr": lr * loraplus_lr_ratio, "weight_decay": weight_decay},
        {"params": groups["no_decay"], "lr": lr * loraplus_lr_ratio, "weight_decay": 0.0},
    ]
    return optimizer_cls([g for g in param_groups if g["params"]], lr=lr, **kwargs)
