"""AdapterDrop's rule as pure functions: which layers skip their adapter, and the robust variant's draw."""

from __future__ import annotations

import torch


def is_dropped(layer_index: int, n: int) -> bool:
    """Whether the layer at ``layer_index`` runs without its adapter when the lowest ``n`` layers are dropped."""
    return layer_index < n


def draw_n(highest: int, generator: torch.Generator | None = None) -> int:
    """Robust AdapterDrop's n for one training forward: uniform over {0, ..., highest}."""
    return int(torch.randint(0, highest + 1, (), generator=generator).item())
