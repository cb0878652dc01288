"""ASA (adaptive subspace allocation): AdaMSS's training-time pruning of whole subspaces, as PEFT 0.21's
``AdamssModel.update_and_allocate``.

Every step in ``[init_warmup, final_warmup]`` each trainable factor ``P`` (every ``A_k`` and ``B_k``) updates
two moving averages from its gradient: the uncertainty ``U = b_u U + (1 - b_u) |I - |P * g||`` (with the
importance before this step), then the importance ``I = b_i I + (1 - b_i) |P * g|``. Every ``mask_interval``
steps within that window a subspace scores ``mean(I_A U_A) + mean(I_B U_B)``; over all layers of the adapter the
subspaces scoring strictly above the ``n``-th largest score keep training, the others are frozen (their factors
stop training; they still act in the forward), and the averages restart. ``n`` falls from the total number of
subspaces to ``asa_target_subspaces`` along ``target + (total - target) (1 - progress)^asa_schedule_exponent``.
A frozen subspace has no gradient, hence no score, and is never reactivated.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class Importance:
    """One adapter layer's moving averages: (I, U) per factor, in the order A_1, B_1, A_2, B_2, ..."""

    def __init__(self, n_factors: int) -> None:
        self.ipt: list[Tensor | None] = [None] * n_factors
        self.unc: list[Tensor | None] = [None] * n_factors

    def reset(self) -> None:
        self.ipt = [None] * len(self.ipt)
        self.unc = [None] * len(self.unc)

    @torch.no_grad()
    def update(self, factors: list[Tensor], importance_beta: float, uncertainty_beta: float) -> None:
        """One step of both averages for every factor that has a gradient (PEFT's order of operations)."""
        for i, p in enumerate(factors):
            if p.grad is None:
                continue
            if self.ipt[i] is None:
                self.ipt[i] = torch.zeros_like(p, requires_grad=False)
                self.unc[i] = torch.zeros_like(p, requires_grad=False)
            ipt = (p * p.grad).abs().detach()
            diff = (ipt - self.ipt[i]).abs()
            self.unc[i].mul_(uncertainty_beta).add_(diff, alpha=1 - uncertainty_beta)
            self.ipt[i].mul_(importance_beta).add_(ipt, alpha=1 - importance_beta)

    def score(self, k: int) -> Tensor | None:
        """Subspace k's score ``mean(I_A U_A) + mean(I_B U_B)``, or None while either factor has no average."""
        a, b = 2 * k, 2 * k + 1
        if self.ipt[a] is None or self.ipt[b] is None:
            return None
        return (self.ipt[a] * self.unc[a]).mean() + (self.ipt[b] * self.unc[b]).mean()


def scheduled_target(step: int, config: Any, total: int) -> int | None:
    """How many subspaces stay trainable at ``step`` (None: no schedule, before the warm-up or no subspace)."""
    if total == 0 or step < config.init_warmup:
        return None
    if step > config.final_warmup:
        return config.asa_target_subspaces
    left = 1.0 - (step - config.init_warmup) / (config.final_warmup - config.init_warmup)
    left = max(0.0, min(1.0, left))
    return int(config.asa_target_subspaces + (total - config.asa_target_subspaces) * (left ** config.asa_schedule_exponent))


def keep_threshold(scores: list[Tensor], target: int) -> float:
    """The score a subspace must exceed to keep training: the ``target``-th largest (``-inf`` when every
    scored subspace fits). As PEFT, the comparison is strict, so ``target - 1`` subspaces stay (without ties)."""
    if target >= len(scores):
        return float("-inf")
    return -torch.kthvalue(-torch.stack(scores), target)[0].item()


def on_step(adapters: list[Any], config: Any, step: int, total: int) -> None:
    """``update_and_allocate(step)`` over one adapter's layers (``adapters``: its ``AdamssAdapter`` per layer,
    in model order), after backward, before zero_grad."""
    if not (config.init_warmup <= step <= config.final_warmup):
        return
    for adapter in adapters:
        adapter.importance.update(adapter.factors(), config.asa_importance_beta, config.asa_uncertainty_beta)
    if step % config.mask_interval != 0:
        return
    target = scheduled_target(step, config, total)
    if target is not None:
        scored = [(adapter, k, s) for adapter in adapters for k in range(adapter.num_subspaces)
                  if (s := adapter.importance.score(k)) is not None]
        if scored:
            threshold = keep_threshold([s for _, _, s in scored], target)
            for adapter, k, s in scored:
                adapter.set_subspace_trainable(k, float(s) > threshold)
    for adapter in adapters:
        adapter.importance.reset()
