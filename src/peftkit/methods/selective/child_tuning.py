"""Child-Tuning (Xu et al. 2021, arXiv 2109.05687): update only a child network of the pre-trained model.

- **Child-Tuning F** (task-free): every backward pass, each gradient entry of the pre-trained weights is
  kept with probability ``p_F`` and rescaled by ``1 / p_F`` (a Bernoulli mask, fresh each time):
  ``g <- g * Bernoulli(p_F) / p_F``. Every entry can change, so each targeted parameter holds a dense delta;
  the mask is applied inside autograd, so it needs no optimizer of its own.
- **Child-Tuning D** (task-driven): a fixed child network, the ``p_D`` fraction of entries with the largest
  empirical Fisher information (global top-k), chosen before training with
  ``model.prepare_selection(dataloader, loss_fn)``; the same machinery as the FISH mask (``masked.py``).

The task head trains in full (``modules_to_save``), as in the paper.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ...registry import register_method
from .config import ChildTuningConfig
from .masked import MaskSelectionAdapter
from .select import record


class BernoulliGrad(torch.autograd.Function):
    """Identity forward; backward keeps each gradient entry with probability ``p``, rescaled by ``1 / p``."""

    @staticmethod
    def forward(ctx, x: Tensor, p: float) -> Tensor:  # type: ignore[override]
        ctx.p = p
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        if ctx.p >= 1:
            return grad, None
        keep = torch.rand(grad.shape, device=grad.device) < ctx.p
        return grad * keep.to(grad.dtype) / ctx.p, None


@register_method(
    "child_tuning",
    config=ChildTuningConfig,
    category="selective",
    modalities=("text", "vision", "vision-language", "generation"),
    mergeable=True,
    param_formula="F: every targeted entry (a fresh Bernoulli(p_F) gradient mask per step); "
    "D: round(p_D N) Fisher-chosen entries",
    position="F: all weights, masked gradients; D: a fixed Fisher-chosen child network",
    paper="arXiv 2109.05687 (Child-Tuning)",
    examples={
        # p_F = 0.9 keeps the contract's "every trainable tensor gets a gradient" deterministic on tiny
        # tensors (at 0.3 a 16-entry bias loses its whole gradient one step in 300, by design)
        "child_tuning_f": {"mode": "F", "reserve_p": 0.9},
        "child_tuning_d_random": {"mode": "D", "reserve_p": 0.3, "criterion": "random"},
    },
)
class ChildTuningAdapter(MaskSelectionAdapter):
    method = "child_tuning"

    def __init__(self, base: nn.Module, config: ChildTuningConfig, key: str = "", init: bool = True) -> None:
        super().__init__(base, config, key, init)
        self.reserve_p = float(config.reserve_p) if config.mode == "F" else None

    @classmethod
    def uses_mask(cls, config: ChildTuningConfig) -> bool:
        return config.mode == "D"

    @classmethod
    def select(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: ChildTuningConfig) -> None:
        if config.mode == "D":
            return super().select(model, named, config)
        found = cls.eligible(model, named, config)
        config.selected_params = record([(path, p, tuple(t.shape), t.numel(), "full") for path, p, t in found])

    def dense(self, pname: str, theta: tuple[Tensor, ...] | None = None, state: Any = None) -> Tensor:
        d = super().dense(pname, theta, state)
        if self.reserve_p is not None and d.requires_grad:
            d = BernoulliGrad.apply(d, self.reserve_p)
        return d
