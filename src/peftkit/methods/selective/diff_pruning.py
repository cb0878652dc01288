"""Diff pruning (Guo, Rush, Kim 2021, arXiv 2012.07463): a sparse, task-specific diff on the frozen model.

    theta = theta0 + z * w,    z = min(1, max(0, s (r - l) + l)),
    s = sigmoid((log u - log(1 - u) + log_alpha) / T),  u ~ U(0, 1)

``z`` are hard-concrete gates (Louizos et al. 2018, arXiv 1712.01312) with stretch interval (l, r); at
evaluation ``s = sigmoid(log_alpha)``. Training minimises ``loss + lambda E[L0]`` with the expected number
of open gates ``E[L0] = sum sigmoid(log_alpha - T log(-l / r))``: its gradient is added in the backward
pass of the gates, so any training loop that calls ``backward`` optimises the penalised objective
(``l0_penalty(model)`` reports the value for logging; do not add it to the loss as well).

After training, ``project_to_sparsity(model)`` keeps the ``round(density N)`` entries of ``z * w`` with the
largest magnitude (global top-k; the paper's projection onto the L0 ball) and turns the adapter into a
fixed sparse diff: indices plus values, saved as such, trainable further with a fixed mask.

Memory: ``w`` and ``log_alpha`` are the trainable tensors (the optimizer needs them for every entry);
the gates, ``z * w`` and ``W0 + z * w`` are per-call temporaries, rebuilt in the backward pass (the
gate noise from a per-call seed), never kept between passes.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ...registry import register_method
from .adapter import SelectiveAdapter
from .config import DiffPruningConfig
from .masked import apply_mask, mask_record
from .select import global_top_k, record, target_count


class L0Grad(torch.autograd.Function):
    """Identity on ``log_alpha``; backward adds ``lam * d E[L0] / d log_alpha`` (the penalty's gradient)."""

    @staticmethod
    def forward(ctx, log_alpha: Tensor, lam: float, shift: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(log_alpha)
        ctx.lam, ctx.shift = lam, shift
        return log_alpha.view_as(log_alpha)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (log_alpha,) = ctx.saved_tensors
        s = torch.sigmoid(log_alpha - ctx.shift)
        return grad + ctx.lam * s * (1 - s), None, None


@register_method(
    "diff_pruning",
    config=DiffPruningConfig,
    category="selective",
    modalities=("text", "vision", "vision-language", "generation"),
    mergeable=True,
    param_formula="2 N while training (diff w and gate logits); round(density N) after projection",
    position="a sparse diff on every targeted parameter",
    paper="arXiv 2012.07463 (diff pruning)",
    examples={"diff_pruning": {"alpha_init": 1.0}},
)
class DiffPruningAdapter(SelectiveAdapter):
    method = "diff_pruning"

    def __init__(self, base: nn.Module, config: DiffPruningConfig, key: str = "", init: bool = True) -> None:
        super().__init__(base, config, key, init)
        self.lam = float(config.l0_lambda)
        self.temperature = float(config.temperature)
        self.limits = (float(config.limit_l), float(config.limit_r))
        self.shift = self.temperature * math.log(-self.limits[0] / self.limits[1])

    @classmethod
    def select(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: DiffPruningConfig) -> None:
        found = cls.eligible(model, named, config)
        config.selected_params = record([(path, p, tuple(t.shape), t.numel(), "gated") for path, p, t in found])

    def forward_state(self) -> Any:
        gated = any(f == "gated" for f in self.formats.values())
        return int(torch.randint(0, 2**62, ())) if self.training and gated else None

    def gate(self, log_alpha: Tensor, state: Any, salt: int = 0) -> Tensor:
        """Hard-concrete gates: sampled with the seed ``state`` (training), deterministic when None."""
        l, r = self.limits
        if state is None:
            s = torch.sigmoid(log_alpha)
        else:
            g = torch.Generator(device=log_alpha.device).manual_seed((state + salt) % 2**63)
            u = torch.rand(log_alpha.shape, generator=g, device=log_alpha.device, dtype=log_alpha.dtype)
            u = u.clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / self.temperature)
        return (s * (r - l) + l).clamp(0, 1)

    def dense(self, pname: str, theta: tuple[Tensor, ...] | None = None, state: Any = None) -> Tensor:
        if self.formats[pname] != "gated":
            return super().dense(pname, theta, state)
        w, log_alpha = self.theta(pname) if theta is None else theta
        if self.lam and log_alpha.requires_grad:
            log_alpha = L0Grad.apply(log_alpha, self.lam, self.shift)
        return self.gate(log_alpha, state, salt=list(self.formats).index(pname)) * w

    def expected_l0(self) -> Tensor:
        """Expected number of open gates of this adapter's gated parameters."""
        total = torch.zeros(())
        for pname, fmt in self.formats.items():
            if fmt == "gated":
                la = getattr(self, f"{pname}_log_alpha").detach()
                total = total + torch.sigmoid(la - self.shift).sum().cpu()
        return total


def _adapters(model: Any, adapter_name: str) -> list[tuple[str, DiffPruningAdapter]]:
    return [(p, a) for p, a in model.base_model.adapters(adapter_name) if isinstance(a, DiffPruningAdapter)]


def l0_penalty(model: Any, adapter_name: str = "default") -> Tensor:
    """The expected L0 norm ``E[L0]`` of a diff-pruning adapter (for logging; its gradient is applied already)."""
    total = torch.zeros(())
    for _, adapter in _adapters(model, adapter_name):
        total = total + adapter.expected_l0()
    return total


@torch.no_grad()
def project_to_sparsity(model: Any, density: float | None = None, adapter_name: str = "default") -> int:
    """Keep the ``round(density N)`` largest-magnitude entries of the trained diff ``z * w`` (deterministic
    gates) over all its parameters together, and turn the adapter into a fixed sparse diff with exactly
    those values. ``density``: default the config's. Returns the number of entries kept."""
    tuner = model.base_model
    config = tuner.peft_config[adapter_name]
    adapters = _adapters(model, adapter_name)
    diffs = {f"{path}.{p}": a.dense(p).detach() for path, a in adapters for p in a.formats}
    k = target_count(sum(d.numel() for d in diffs.values()), density=config.density if density is None else density)
    mask = global_top_k({n: d.abs() for n, d in diffs.items()}, k)
    candidates = [(path, p, tuner.model.get_submodule(path + ".base_layer")._parameters[p])
                  for path, a in adapters for p in a.formats]
    apply_mask(model, adapter_name, mask_record(candidates, mask), mask)
    for path, adapter in tuner.adapters(adapter_name):
        for pname, fmt in adapter.formats.items():
            idx = mask[f"{path}.{pname}"].to(adapter.index(pname).device if fmt == "sparse" else "cpu")
            diff = diffs[f"{path}.{pname}"].reshape(-1)
            (values,) = adapter.theta(pname)
            if fmt == "sparse":
                values.copy_(diff[idx.to(diff.device)].to(values.dtype))
            else:  # full or masked: the dense diff, zero outside the kept entries
                kept = torch.zeros_like(diff)
                kept[idx.to(diff.device)] = diff[idx.to(diff.device)]
                values.copy_(kept.view_as(values).to(values.dtype))
    if density is not None:
        config.density = density
    return k
