"""Preference tuning (``task: dpo``): the recipe section ``preference:``, the response log-probabilities and
the four pairwise losses.

A pair is a prompt ``x`` with a chosen response ``y_c`` and a rejected one ``y_r``. ``log pi(y|x)`` is the sum
of the per-token log-probabilities of the response tokens only (prompt and padding positions do not count);
``avg log pi(y|x)`` is that sum divided by the number of response tokens. With ``h = (log pi(y_c|x) -
log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x))``, per pair:

- DPO (Rafailov et al. 2023): ``-log sigmoid(beta * h)``.
- IPO (Azar et al. 2023): ``(h - 1 / (2 beta))^2``, on summed log-probabilities as in the paper (TRL's
  ``loss_type="ipo"`` averages them over the response length first).
- ORPO (Hong et al. 2024): ``-avg log pi(y_c|x) + lambda * -log sigmoid(log odds(y_c) - log odds(y_r))`` with
  ``odds(y) = P / (1 - P)`` and ``log P = avg log pi(y|x)`` (length-normalised, as in the paper); the first
  term is the per-pair mean token NLL of the chosen response. No reference model.
- SimPO (Meng et al. 2024): ``-log sigmoid(beta * (avg log pi(y_c|x) - avg log pi(y_r|x)) - gamma)``. No
  reference model.

The reference of DPO and IPO is the policy itself with its adapter disabled (``model.disable_adapter()``,
under ``no_grad``), evaluated in the same step on the same batch: PEFT leaves the base weights frozen, so
the base *is* the initial policy and no second copy of the model is built.

Implicit rewards (reported as ``reward_accuracy``, the fraction of pairs whose chosen reward exceeds the
rejected one, and ``reward_margin``, their mean difference): ``beta * (log pi - log ref)`` for DPO and IPO,
``beta * avg log pi`` for ORPO and SimPO (as TRL reports them; ORPO's loss itself does not read ``beta``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOSSES = ("dpo", "ipo", "orpo", "simpo")
REFERENCE_LOSSES = ("dpo", "ipo")  # the losses that read the reference log-probabilities


@dataclass
class PreferenceSpec:
    """The recipe's ``preference:`` section (read by ``task: dpo`` only)."""

    loss: str = "dpo"  # dpo, ipo, orpo or simpo
    beta: float = 0.1  # DPO / IPO / SimPO temperature; every loss's implicit-reward scale
    orpo_lambda: float = 0.1  # ORPO: weight of the odds-ratio term
    simpo_gamma: float = 0.5  # SimPO: target reward margin
    chosen_column: str = "chosen"  # the prompt is data.text_column
    rejected_column: str = "rejected"
    candidates: list[str] | None = None  # the label set, for label accuracy on the test rows (None: not scored)


def preference_problem(recipe: Any) -> str | None:
    """What is wrong with the ``preference:`` fields (out of range, or set where nothing reads them), led by the
    dotted YAML path; None when nothing is (``recipe.py`` raises it as a RecipeError)."""
    p, default = recipe.preference, PreferenceSpec()
    if recipe.task != "dpo":
        for f in dataclasses.fields(PreferenceSpec):
            if getattr(p, f.name) != getattr(default, f.name):
                return f"preference.{f.name}: only task dpo reads it (task {recipe.task})"
        return None
    if p.loss not in LOSSES:
        return f"preference.loss: expected one of {', '.join(LOSSES)}, got {p.loss!r}"
    for name in ("beta", "orpo_lambda", "simpo_gamma"):
        value = getattr(p, name)
        if not math.isfinite(value):
            return f"preference.{name}: expected a finite number, got {value}"
    if p.beta <= 0:
        return f"preference.beta: expected a positive number, got {p.beta}"
    if p.orpo_lambda < 0:
        return f"preference.orpo_lambda: expected a number >= 0, got {p.orpo_lambda}"
    if p.simpo_gamma < 0:
        return f"preference.simpo_gamma: expected a number >= 0, got {p.simpo_gamma}"
    for name, owner in (("orpo_lambda", "orpo"), ("simpo_gamma", "simpo")):
        if p.loss != owner and getattr(p, name) != getattr(default, name):
            return f"preference.{name}: only loss {owner} reads it (loss {p.loss})"
    columns = {"data.text_column": recipe.data.text_column, "preference.chosen_column": p.chosen_column,
               "preference.rejected_column": p.rejected_column}
    for dotted, name in columns.items():
        if not name.strip():
            return f"{dotted}: expected a column name, got {name!r}"
        if list(columns.values()).count(name) > 1:
            return (f"{dotted}: {name!r} names another column too; prompt, chosen and rejected are "
                    "three different columns")
    if p.candidates is not None:
        names = [c.strip() for c in p.candidates]
        if len(names) < 2 or not all(names) or len(set(names)) < len(names):
            return f"preference.candidates: expected at least 2 distinct non-empty responses, got {p.candidates}"
    return None


# ---------------------------------------------------------------------------------------------- log-probs
def _unwrap(model: nn.Module) -> nn.Module:
    """The PEFT model inside a DistributedDataParallel wrapper (the forward still goes through the wrapper)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def token_logps(model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """Per-token ``log p(token)`` of the scored tokens (``labels != -100``, shifted by one), as a
    ``(rows, length - 1)`` tensor that is 0 elsewhere, and that mask. Only the scored positions go through the
    output layer (a pre-hook on it, as in losses.py)."""
    labels = batch["labels"]
    target = labels[:, 1:]
    keep = target != -100
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    inner = _unwrap(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is None:
        logits = model(**inputs).logits
        virtual = logits.shape[1] - labels.shape[1]
        picked = logits[:, virtual : virtual + labels.shape[1] - 1][keep]
    else:
        def pick(module: nn.Module, args: tuple) -> tuple:
            hidden = args[0]
            virtual = hidden.shape[1] - labels.shape[1]  # prompt methods put virtual tokens first
            return (hidden[:, virtual : virtual + labels.shape[1] - 1][keep],) + tuple(args[1:])

        handle = head.register_forward_pre_hook(pick)
        try:
            picked = model(**inputs).logits
        finally:
            handle.remove()
    flat = torch.log_softmax(picked.float(), -1).gather(-1, target[keep][:, None])[:, 0]
    return torch.zeros(keep.shape, dtype=flat.dtype, device=flat.device).masked_scatter(keep, flat), keep


def response_logps(model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """Per row: the sum of ``log p(token)`` over the response tokens (``token_logps``), and how many there are."""
    per_token, keep = token_logps(model, batch)
    rows = keep.nonzero()[:, 0]  # boolean indexing is row-major: the row of each scored position
    sums = per_token.new_zeros(per_token.shape[0])
    return sums.index_add(0, rows, per_token[keep]), keep.sum(1)


def reference_logps(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    """``response_logps`` of the base model: the same model with its adapter disabled, without gradients."""
    with torch.no_grad(), _unwrap(model).disable_adapter():
        return response_logps(model, batch)[0]


# ---------------------------------------------------------------------------------------------- the losses
def dpo_losses(pi_c: Tensor, pi_r: Tensor, ref_c: Tensor, ref_r: Tensor, beta: float) -> Tensor:
    return -F.logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))


def ipo_losses(pi_c: Tensor, pi_r: Tensor, ref_c: Tensor, ref_r: Tensor, beta: float) -> Tensor:
    return ((pi_c - ref_c) - (pi_r - ref_r) - 1 / (2 * beta)) ** 2


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate near 0 and for large ``-x`` (Maechler 2012); ``x`` is kept
    below -1e-12 so that a response the model is certain of gives a finite log-odds."""
    x = x.clamp(max=-1e-12)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_losses(avg_c: Tensor, avg_r: Tensor, lam: float) -> Tensor:
    log_odds = (avg_c - avg_r) - (log1mexp(avg_c) - log1mexp(avg_r))
    return -avg_c + lam * -F.logsigmoid(log_odds)


def simpo_losses(avg_c: Tensor, avg_r: Tensor, beta: float, gamma: float) -> Tensor:
    return -F.logsigmoid(beta * (avg_c - avg_r) - gamma)


class PairLoss(NamedTuple):
    loss: Tensor  # the batch mean
    losses: Tensor  # per pair
    chosen_rewards: Tensor  # implicit rewards, detached
    rejected_rewards: Tensor


def pair_loss(spec: PreferenceSpec, logps: Tensor, counts: Tensor, ref_logps: Tensor | None = None) -> PairLoss:
    """The loss of ``spec.loss`` for rows ``[chosen_1..chosen_B, rejected_1..rejected_B]`` (summed log-probs,
    response token counts and, for DPO / IPO, the reference's summed log-probs)."""
    pi_c, pi_r = logps.chunk(2)
    if spec.loss in REFERENCE_LOSSES:
        if ref_logps is None:
            raise ValueError(f"preference loss {spec.loss} needs the reference log-probabilities")
        ref_c, ref_r = ref_logps.chunk(2)
        fn = dpo_losses if spec.loss == "dpo" else ipo_losses
        losses = fn(pi_c, pi_r, ref_c, ref_r, spec.beta)
        reward_c, reward_r = spec.beta * (pi_c - ref_c), spec.beta * (pi_r - ref_r)
    else:
        n_c, n_r = counts.clamp(min=1).to(logps.dtype).chunk(2)
        avg_c, avg_r = pi_c / n_c, pi_r / n_r
        if spec.loss == "orpo":
            losses = orpo_losses(avg_c, avg_r, spec.orpo_lambda)
        else:
            losses = simpo_losses(avg_c, avg_r, spec.beta, spec.simpo_gamma)
        reward_c, reward_r = spec.beta * avg_c, spec.beta * avg_r
    return PairLoss(losses.mean(), losses, reward_c.detach(), reward_r.detach())
