"""AdaLoRA's rank allocation and orthogonality penalty (Zhang et al. 2023, arXiv 2303.10512).

Each adapted matrix is ``W0 + P diag(lambda) Q`` (eq. 3); in files and code ``P`` is ``lora_B``
(d_out, r), ``lambda`` is ``lora_E`` (r, 1) and ``Q`` is ``lora_A`` (r, d_in). Singular triplet ``i`` of a
matrix is ``(P[:, i], lambda_i, Q[i, :])``. Every step the allocator scores each entry ``w`` of
``P, lambda, Q`` (eqs. 7-9):

    I(w)      = |w * dL/dw|                                   sensitivity
    Ibar_t    = beta1 Ibar_{t-1} + (1 - beta1) I_t            smoothed sensitivity (eq. 8)
    Ubar_t    = beta2 Ubar_{t-1} + (1 - beta2) |I_t - Ibar_t| uncertainty (eq. 9)
    s(w)      = Ibar_t * Ubar_t                               entry importance (eq. 7)

and a triplet by ``S_i = s(lambda_i) + mean_j s(P_ji) + mean_j s(Q_ij)`` (eq. 10). The total rank budget
``b(t)`` follows the cubic schedule of eq. (12) from ``init_r`` per matrix down to ``target_r`` per matrix;
every ``deltaT`` steps the triplets with the lowest scores are masked (``lambda_i = 0``, eq. 11) until only
``b(t)`` remain. At step ``total_step - tfinal`` the final mask is fixed and re-applied every later step.

The arithmetic follows Hugging Face PEFT's ``RankAllocator`` operation for operation, so the same
gradients give the same masks (see tests/methods/test_adalora.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import torch
from torch import Tensor

Mask = list[bool]  # per triplet of one matrix: True = kept


class Triplets(Protocol):
    """What the allocator reads from one adapted matrix (an ``AdaLoraAdapter``)."""

    lora_A: Tensor  # Q (r, d_in)
    lora_E: Tensor  # lambda (r, 1)
    lora_B: Tensor  # P (d_out, r)


FACTORS = ("lora_A", "lora_E", "lora_B")


def budget_schedule(
    step: int, *, init_bgt: int, target_bgt: int, tinit: int, tfinal: int, total_step: int, deltaT: int
) -> tuple[int, bool]:
    """The total rank budget ``b(t)`` at ``step`` and whether to re-mask then (eq. 12).

    ``b(t) = init_bgt`` for ``t <= tinit``; ``target_bgt`` after ``total_step - tfinal``; in between
    ``int(target + (init - target) (1 - (t - tinit) / (total_step - tfinal - tinit))^3)``, masking when
    ``t`` is a multiple of ``deltaT``.
    """
    if step <= tinit:
        return init_bgt, False
    if step > total_step - tfinal:
        return target_bgt, True
    mul_coeff = 1 - (step - tinit) / (total_step - tfinal - tinit)
    budget = int((init_bgt - target_bgt) * (mul_coeff**3) + target_bgt)
    return budget, step % deltaT == 0


def orthogonality_penalty(factors: Iterable[tuple[Tensor, Tensor]]) -> Tensor | None:
    """Mean over all ``Q`` and ``P`` of ``||Q Q^T - I||_F`` and ``||P^T P - I||_F`` (None without factors).

    The paper's eq. (4) regularizer is ``||P^T P - I||_F^2 + ||Q Q^T - I||_F^2``; Hugging Face PEFT (and so
    peftkit, for identical losses) uses the Frobenius norm itself, averaged over the matrices.
    ``factors``: ``(Q, P)`` = ``(lora_A, lora_B)`` per adapted matrix.
    """
    total: Tensor | int = 0
    count = 0
    for A, B in factors:
        for cov in (A @ A.T, B.T @ B):  # (r, r) each; mm's backward keeps its inputs, not cov
            cov.diagonal().sub_(1)  # cov - I without an identity matrix
            total = total + torch.linalg.vector_norm(cov)
            count += 1
    return total / count if count else None


class RankAllocator:
    """Importance averages and budget of one adapter's matrices (keyed by module path).

    ``init_bgt`` is the sum of the starting ranks, ``target_bgt = target_r * number of matrices``.
    Call :meth:`update_and_allocate` once per training step, after ``backward()`` and before the gradients
    are cleared; it masks ``lora_E`` in place and returns the new masks whenever it re-allocates.
    """

    def __init__(self, config: Any, ranks: Mapping[str, int]) -> None:
        self.config = config
        self.beta1 = config.beta1
        self.beta2 = config.beta2
        self.init_bgt = sum(ranks.values())
        self.target_bgt = config.target_r * len(ranks)
        self.reset_ipt()

    def reset_ipt(self) -> None:
        """Forget the importance averages (done once the final mask is fixed, as in PEFT)."""
        self.ipt: dict[tuple[str, str], Tensor] = {}
        self.exp_avg_ipt: dict[tuple[str, str], Tensor] = {}
        self.exp_avg_unc: dict[tuple[str, str], Tensor] = {}
        self._scratch: dict[tuple[str, str], Tensor] = {}  # one work buffer per factor

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        c = self.config
        return budget_schedule(step, init_bgt=self.init_bgt, target_bgt=self.target_bgt, tinit=c.tinit,
                               tfinal=c.tfinal, total_step=c.total_step, deltaT=c.deltaT)

    @torch.no_grad()
    def update_ipt(self, triplets: Mapping[str, Triplets]) -> None:
        """Fold the current gradients into the sensitivity / uncertainty averages (eqs. 8, 9)."""
        for path, t in triplets.items():
            for name in FACTORS:
                p = getattr(t, name)
                if p.grad is None:
                    raise RuntimeError(
                        f"AdaLoRA update_and_allocate: {path}.{name} has no gradient; call it after "
                        "loss.backward() and before optimizer.zero_grad()"
                    )
                key = (path, name)
                if key not in self.ipt:
                    self.ipt[key] = torch.empty_like(p)
                    self.exp_avg_ipt[key] = torch.zeros_like(p)
                    self.exp_avg_unc[key] = torch.zeros_like(p)
                    self._scratch[key] = torch.empty_like(p)
                # in place, in PEFT's operation order (the same roundings): no per-step allocations
                ipt, avg, unc, tmp = self.ipt[key], self.exp_avg_ipt[key], self.exp_avg_unc[key], self._scratch[key]
                torch.mul(p, p.grad, out=ipt).abs_()  # I_t
                avg.mul_(self.beta1).add_(torch.mul(ipt, 1 - self.beta1, out=tmp))  # Ibar_t
                torch.sub(ipt, avg, out=tmp).abs_()  # |I_t - Ibar_t|
                unc.mul_(self.beta2).add_(tmp.mul_(1 - self.beta2))  # Ubar_t

    def _element_score(self, key: tuple[str, str]) -> Tensor:
        return self.exp_avg_ipt[key] * self.exp_avg_unc[key]  # s(w), eq. (7)

    def triplet_scores(self, triplets: Mapping[str, Triplets]) -> dict[str, Tensor]:
        """``S_i`` of every triplet (eq. 10), one (r,) vector per matrix."""
        scores = {}
        for path in triplets:
            ipt_A = torch.mean(self._element_score((path, "lora_A")), dim=1, keepdim=True)  # (r, 1)
            ipt_B = torch.mean(self._element_score((path, "lora_B")), dim=0, keepdim=False).view(-1, 1)  # (r, 1)
            ipt_E = self._element_score((path, "lora_E"))  # (r, 1)
            scores[path] = ipt_E.view(-1) + torch.cat([ipt_A, ipt_B], dim=1).sum(dim=1)
        return scores

    @torch.no_grad()
    def mask_to_budget(self, triplets: Mapping[str, Triplets], budget: int) -> dict[str, Mask]:
        """Zero ``lambda`` of the ``init_bgt - budget`` lowest-scoring triplets (ties at the threshold too)."""
        scores = self.triplet_scores(triplets)
        k = self.init_bgt - budget
        if k <= 0:  # nothing to prune (PEFT's kthvalue would fail on k = 0)
            return {path: [True] * s.numel() for path, s in scores.items()}
        threshold = torch.kthvalue(torch.cat([s.view(-1) for s in scores.values()]), k=k)[0].item()
        masks = {}
        for path, t in triplets.items():
            drop = scores[path].view(-1, 1) <= threshold
            t.lora_E.masked_fill_(drop, 0.0)
            masks[path] = (~drop).view(-1).tolist()
        return masks

    @staticmethod
    @torch.no_grad()
    def apply_masks(triplets: Mapping[str, Triplets], masks: Mapping[str, Mask]) -> None:
        """Zero ``lambda`` where ``masks`` says False (matrices without a mask of their rank are left alone)."""
        for path, t in triplets.items():
            mask = masks.get(path)
            if mask is not None and len(mask) == t.lora_E.shape[0]:
                keep = torch.tensor(mask, dtype=torch.bool, device=t.lora_E.device).unsqueeze(-1)
                t.lora_E.masked_fill_(~keep, 0.0)

    def update_and_allocate(
        self, triplets: Mapping[str, Triplets], global_step: int, current: Mapping[str, Mask] | None = None
    ) -> dict[str, Mask] | None:
        """One training step of AdaLoRA; returns the new masks when it (re-)allocated, else None.

        Before ``total_step - tfinal``: update the importance and, on schedule, mask to the budget. At
        ``total_step - tfinal``: the final mask at ``target_bgt`` (the averages are then reset). After it:
        re-apply ``current`` (the adapter's saved ``rank_pattern``), since the optimizer moves masked
        ``lambda`` away from zero.
        """
        final_step = self.config.total_step - self.config.tfinal
        if global_step < final_step:
            self.update_ipt(triplets)
            budget, mask_now = self.budget_schedule(global_step)
            return self.mask_to_budget(triplets, budget) if mask_now else None
        if global_step == final_step:
            budget, _ = self.budget_schedule(global_step)
            masks = self.mask_to_budget(triplets, budget)
            self.reset_ipt()
            return masks
        if current:
            self.apply_masks(triplets, current)
        return None
