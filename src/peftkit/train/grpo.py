"""Group Relative Policy Optimisation (``task: grpo``; Shao et al. 2024, DeepSeekMath): the recipe section
``grpo:``, the rule-based rewards, the group-normalised advantages and the clipped objective with its KL term.

For each prompt ``q`` the policy ``pi`` (the model with its adapter) samples ``G`` completions ``o_1..o_G``;
a rule gives each a reward ``r_i`` and its advantage is the reward normalised within its group,
``A_i = (r_i - mean(r)) / (std(r) + eps)`` (``std`` with Bessel's correction, ``eps = 1e-4``, as TRL's
``GRPOTrainer``). Every token ``t`` of ``o_i`` gets the same ``A_i``, and with ``rho = pi(o_t) / pi_old(o_t)``
(``pi_old``: the policy that sampled, detached) the loss is

    L = mean_i 1/|o_i| sum_t -[min(rho A_i, clip(rho, 1 - epsilon, 1 + epsilon) A_i) - beta * KL_t]
    KL_t = exp(ref_t - pi_t) - (ref_t - pi_t) - 1            (the k3 estimator of KL(pi || ref), >= 0)

with ``pi_t``, ``ref_t`` per-token log-probabilities of the completion tokens only (prompt and padding
positions do not count; a completion ends at its first EOS, which counts). The per-completion token mean,
then the mean over completions, is the paper's normalisation (TRL's ``loss_type="grpo"``). One update per
sampled batch makes ``rho = 1`` exactly; the clip form is kept so that the objective is the paper's.

The reference ``ref`` is the policy itself with its adapter disabled (``model.disable_adapter()`` under
``no_grad``): PEFT leaves the base frozen, so the base is the initial policy and no second model is built.

Rewards (``grpo.reward``), 1.0 or 0.0 per completion, against the row's label (``data.label_column``):

- ``{type: exact}``: the completion's first word equals the label (its first ``k`` whitespace-separated words
  for a label of ``k`` words; ``whole: true``: all of its words); ``ignore_case: true`` compares casefolded.
- ``{type: regex, pattern: ...}``: ``re.search(pattern, completion)`` finds a match; ``{label}`` in the
  pattern stands for the label, escaped (``"^\\s*{label}\\b"``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .preference import _unwrap, token_logps

REWARDS = ("exact", "regex")
ADV_EPS = 1e-4  # the advantage's denominator is std + ADV_EPS (TRL's value)


@dataclass
class RewardSpec:
    """``grpo.reward``: the rule that scores a completion against its row's label."""

    type: str = "exact"  # exact or regex
    pattern: str | None = None  # regex: searched in the completion; {label} stands for the escaped label
    whole: bool = False  # exact: compare every word of the completion, not only the first ones
    ignore_case: bool = False


@dataclass
class GrpoSpec:
    """The recipe's ``grpo:`` section (read by ``task: grpo`` only)."""

    num_generations: int = 4  # G: completions sampled per prompt (a group)
    max_new_tokens: int = 8  # completion length limit (a completion also ends at EOS)
    temperature: float = 1.0  # sampling temperature (no top-k / top-p truncation)
    epsilon: float = 0.2  # clip range of the ratio: [1 - epsilon, 1 + epsilon]
    beta: float = 0.04  # weight of the KL(pi || ref) term (0: no reference forward)
    reward: RewardSpec = field(default_factory=RewardSpec)


def grpo_problem(recipe: Any) -> str | None:
    """What is wrong with the ``grpo:`` fields (out of range, or set where nothing reads them), led by the
    dotted YAML path; None when nothing is (``recipe.py`` raises it as a RecipeError)."""
    g, default = recipe.grpo, GrpoSpec()
    if recipe.task != "grpo":
        for name, value in _flat(g).items():
            if value != _flat(default)[name]:
                return f"grpo.{name}: only task grpo reads it (task {recipe.task})"
        return None
    if g.num_generations < 2:
        return f"grpo.num_generations: expected an integer >= 2 (a group), got {g.num_generations}"
    if g.max_new_tokens < 1:
        return f"grpo.max_new_tokens: expected a positive integer, got {g.max_new_tokens}"
    if g.max_new_tokens >= recipe.data.max_length:
        return (f"grpo.max_new_tokens: expected an integer below data.max_length ({recipe.data.max_length}), "
                f"got {g.max_new_tokens}")
    for name in ("temperature", "epsilon", "beta"):
        if not math.isfinite(getattr(g, name)):
            return f"grpo.{name}: expected a finite number, got {getattr(g, name)}"
    if g.temperature <= 0:
        return f"grpo.temperature: expected a positive number, got {g.temperature}"
    if not 0 < g.epsilon < 1:
        return f"grpo.epsilon: expected a number in (0, 1), got {g.epsilon}"
    if g.beta < 0:
        return f"grpo.beta: expected a number >= 0, got {g.beta}"
    r = g.reward
    if r.type not in REWARDS:
        return f"grpo.reward.type: expected one of {', '.join(REWARDS)}, got {r.type!r}"
    if r.type == "regex":
        if not r.pattern:
            return "grpo.reward.pattern: reward type regex needs a pattern"
        try:
            re.compile(r.pattern.replace("{label}", "x"))
        except re.error as exc:
            return f"grpo.reward.pattern: not a regular expression ({exc}): {r.pattern!r}"
        if r.whole:
            return "grpo.reward.whole: only reward type exact reads it (type regex)"
    elif r.pattern is not None:
        return "grpo.reward.pattern: only reward type regex reads it (type exact)"
    d = recipe.data
    for dotted, name in (("data.text_column", d.text_column), ("data.label_column", d.label_column)):
        if not name.strip():
            return f"{dotted}: expected a column name, got {name!r}"
    if d.text_column == d.label_column:
        return f"data.label_column: {d.label_column!r} is data.text_column too; prompt and label are two columns"
    return None


def _flat(spec: GrpoSpec) -> dict[str, Any]:
    out = {f.name: getattr(spec, f.name) for f in dataclasses.fields(GrpoSpec) if f.name != "reward"}
    out.update({f"reward.{k}": v for k, v in dataclasses.asdict(spec.reward).items()})
    return out


# ---------------------------------------------------------------------------------------------- rewards
def exact_reward(completion: str, label: str, *, whole: bool = False, ignore_case: bool = False) -> float:
    """1.0 when the completion's first words (all of them with ``whole``) are the label's words, else 0.0."""
    got, want = completion.split(), label.split()
    if ignore_case:
        got, want = [w.casefold() for w in got], [w.casefold() for w in want]
    return float(bool(want) and (got if whole else got[: len(want)]) == want)


def regex_reward(completion: str, label: str, pattern: str, *, ignore_case: bool = False) -> float:
    """1.0 when ``pattern`` (``{label}``: the escaped label) matches somewhere in the completion, else 0.0."""
    flags = re.IGNORECASE if ignore_case else 0
    return float(re.search(pattern.replace("{label}", re.escape(label)), completion, flags) is not None)


def reward(spec: RewardSpec, completion: str, label: str) -> float:
    if spec.type == "exact":
        return exact_reward(completion, label, whole=spec.whole, ignore_case=spec.ignore_case)
    if spec.type == "regex":
        return regex_reward(completion, label, spec.pattern or "", ignore_case=spec.ignore_case)
    raise ValueError(f"grpo.reward.type: expected one of {', '.join(REWARDS)}, got {spec.type!r}")


# ---------------------------------------------------------------------------------------------- the objective
def group_advantages(rewards: Tensor, group: int, eps: float = ADV_EPS) -> Tensor:
    """``(r - mean) / (std + eps)`` within each run of ``group`` consecutive rewards (one prompt's group)."""
    r = rewards.view(-1, group)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).reshape(-1)


def group_reward_std(rewards: Tensor, group: int) -> Tensor:
    """The mean over groups of the rewards' standard deviation within each group (Bessel's correction, as the
    advantages' ``std``; TRL's logged ``reward_std``)."""
    return rewards.float().view(-1, group).std(1).mean()


def reference_token_logps(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    """``token_logps`` of the base model: the same model with its adapter disabled, without gradients."""
    with torch.no_grad(), _unwrap(model).disable_adapter():
        return token_logps(model, batch)[0]


class GrpoLoss(NamedTuple):
    loss: Tensor
    kl: Tensor  # mean per-token k3 KL over the completion tokens, detached
    clipped: Tensor  # fraction of completion tokens whose ratio was clipped, detached


def grpo_loss(logps: Tensor, old_logps: Tensor, ref_logps: Tensor | None, mask: Tensor, advantages: Tensor,
              epsilon: float, beta: float) -> GrpoLoss:
    """The clipped GRPO objective (module docstring) on per-token log-probs ``(rows, length)`` of the policy,
    the sampling policy (detached here) and the reference (None: ``beta`` must be 0), a mask of the
    completion tokens and one advantage per row."""
    mask = mask.to(logps.dtype)
    a = advantages.to(logps.dtype)[:, None]
    ratio = torch.exp(logps - old_logps.detach())
    surrogate = torch.min(ratio * a, ratio.clamp(1 - epsilon, 1 + epsilon) * a)
    per_token = -surrogate
    kl = torch.zeros_like(logps)
    if beta:
        if ref_logps is None:
            raise ValueError("grpo: beta > 0 needs the reference log-probabilities")
        delta = ref_logps.detach() - logps
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
    counts = mask.sum(1).clamp(min=1)
    loss = ((per_token * mask).sum(1) / counts).mean()
    tokens = mask.sum().clamp(min=1)
    clipped = ((ratio - ratio.clamp(1 - epsilon, 1 + epsilon)).abs() > 0).to(logps.dtype)
    return GrpoLoss(loss, ((kl * mask).sum() / tokens).detach(), ((clipped * mask).sum() / tokens).detach())
