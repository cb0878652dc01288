"""Adapter arithmetic: combine LoRA adapters into a new one (``PeftModel.add_weighted_adapter``).

The weight math is pure functions on tensors. Every combination type is defined on the adapters' *delta
weights* ``dW_i = s_i B_i A_i`` (``s_i`` each adapter's own scaling for that layer: ``alpha / r``, or
``alpha / sqrt(r)`` with rsLoRA, after ``rank_pattern`` / ``alpha_pattern``), and the merged adapter is a
factorisation of the merged delta with scaling exactly 1 (``lora_alpha = r`` per layer, no rsLoRA):

========================  ========================================================  =====================
combination_type          merged delta                                              rank per layer
========================  ========================================================  =====================
linear, cat               ``sum_i w_i dW_i`` (exact: factors concatenated)           ``sum_i r_i``
svd                       best rank-k approximation of ``sum_i w_i dW_i``            ``svd_rank`` or max r_i
ties / ties_svd           TIES (trim to ``density``, elect sign, disjoint mean)      full / svd rank
dare_linear(_svd)         DARE (random drop to ``density``, rescale) then sum        full / svd rank
dare_ties(_svd)           DARE drop then TIES sign election                          full / svd rank
magnitude_prune(_svd)     magnitude trim to ``density`` then weighted sum            full / svd rank
========================  ========================================================  =====================

"full" rank: a pruned merge is in general full-rank, so the non-``_svd`` types keep every non-zero
singular direction (exact up to rounding; rank up to ``min(d_out, d_in)``) unless ``svd_rank`` truncates.

Differences from Hugging Face PEFT 0.21 (see docs/merging.md):

- ``linear`` / ``ties`` / ``dare_*`` / ``magnitude_prune`` (no ``_svd``): PEFT combines the A and the B
  factors separately, ``B' A' = (sum_i c_i B_i)(sum_j c_j A_j)``, which adds cross terms ``B_i A_j`` and
  prunes factor entries rather than weight entries. peftkit combines the delta weights (above); ``linear``
  is therefore exact and equals ``cat``. PEFT also requires equal ranks for these; peftkit does not.
- rsLoRA: PEFT copies ``use_rslora`` into the merged config with ``lora_alpha = r``, so the merged
  adapter is scaled by ``sqrt(r)`` instead of 1. peftkit writes ``use_rslora=False``.
- ``rank_pattern`` / ``alpha_pattern``: PEFT drops them and sizes every layer by the largest rank (``cat``:
  sum of the largest ranks, zero-padded). peftkit sizes each layer by its own ranks and records them in the
  merged config's ``rank_pattern`` / ``alpha_pattern`` (keys: the escaped layer paths).
- PEFT returns silently when ``adapter_name`` exists, and accepts adapters with different targets (the
  union). peftkit raises, naming the adapter or the modules that differ, and refuses other methods, DoRA
  and more than one adapter with ``modules_to_save`` on a module (as PEFT).
- ``modules_to_save``: when one of the adapters trains a module in full, the merged adapter saves it too (as
  PEFT), but starts from that adapter's trained copy; PEFT gives it a fresh copy of the original module.
- ``svd_driver`` is accepted and passed to ``torch.linalg.svd`` (CUDA only, as in PEFT).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .config import LoraConfig

COMBINATION_TYPES = (
    "svd", "linear", "cat", "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd",
    "magnitude_prune", "magnitude_prune_svd",
)
_NEEDS_DENSITY = ("ties", "dare_ties", "dare_linear", "magnitude_prune")


# -- pure functions on tensors -------------------------------------------------------------------------
def magnitude_mask(t: Tensor, density: float) -> Tensor:
    """Keep the ``int(density * numel)`` largest-magnitude entries of ``t`` (others zero)."""
    if density >= 1:
        return t
    k = int(density * t.numel())
    mask = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    mask[torch.topk(t.abs().reshape(-1), k=k, largest=True).indices] = 1
    return t * mask.reshape(t.shape)


def random_drop(t: Tensor, density: float, rescale: bool = True, generator: torch.Generator | None = None) -> Tensor:
    """DARE: keep each entry with probability ``density`` (Bernoulli), divided by ``density`` if ``rescale``."""
    if density >= 1:
        return t
    mask = torch.bernoulli(torch.full_like(t, density), generator=generator)
    out = t * mask
    return out / density if rescale else out


def weighted_sum(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Task arithmetic: ``sum_i w_i t_i``."""
    stacked = torch.stack(list(tensors))
    return (stacked * _along(stacked, weights)).sum(0)


def majority_sign_mask(stacked: Tensor, method: str = "total") -> Tensor:
    """TIES sign election over dim 0: entries whose sign agrees with the majority (by total mass or count)."""
    sign = stacked.sign()
    if method == "total":
        mass = stacked.sum(0)
    elif method == "frequency":
        mass = sign.sum(0)
    else:
        raise ValueError(f"majority_sign_method: expected 'total' or 'frequency', got {method!r}")
    return sign == torch.where(mass >= 0, 1.0, -1.0).to(sign.dtype)


def disjoint_merge(weighted: Tensor, mask: Tensor) -> Tensor:
    """Mean over dim 0 of the entries that agree with the elected sign (0 where none does)."""
    return (weighted * mask).sum(0) / mask.sum(0).clamp(min=1)


def ties(tensors: Sequence[Tensor], weights: Sequence[float], density: float, majority_sign_method: str = "total",
         prune: Any = None) -> Tensor:
    """TIES-merging (Yadav et al. 2023, arXiv 2306.01708): trim, elect sign, disjoint merge.
    ``prune(t)`` replaces the magnitude trim (DARE-TIES)."""
    trimmed = torch.stack([prune(t) if prune else magnitude_mask(t, density) for t in tensors])
    mask = majority_sign_mask(trimmed, majority_sign_method)
    return disjoint_merge(trimmed * _along(trimmed, weights), mask)


def combine(deltas: Sequence[Tensor], weights: Sequence[float], combination_type: str, density: float | None = None,
            majority_sign_method: str = "total", generator: torch.Generator | None = None) -> Tensor:
    """The merged delta weight of one layer for any combination type (``*_svd``: before the factorisation)."""
    kind = combination_type.removesuffix("_svd")
    if kind in ("linear", "cat", "svd"):
        return weighted_sum(deltas, weights)
    if density is None:
        raise ValueError(f"combination_type={combination_type!r} needs density (a value in [0, 1])")
    if not 0 <= density <= 1:
        raise ValueError(f"density: expected a value in [0, 1], got {density}")
    if kind == "magnitude_prune":
        return weighted_sum([magnitude_mask(d, density) for d in deltas], weights)
    if kind == "dare_linear":
        return weighted_sum([random_drop(d, density, generator=generator) for d in deltas], weights)
    if kind == "ties":
        return ties(deltas, weights, density, majority_sign_method)
    if kind == "dare_ties":
        return ties(deltas, weights, density, majority_sign_method,
                    prune=lambda t: random_drop(t, density, generator=generator))
    raise ValueError(f"combination_type: expected one of {COMBINATION_TYPES}, got {combination_type!r}")


def svd_factors(delta: Tensor, rank: int | None, clamp: float | None = None, full_matrices: bool = True,
                driver: str | None = None) -> tuple[Tensor, Tensor]:
    """(A (k, d_in), B (d_out, k)) with ``B A`` the best rank-k approximation of ``delta`` (d_out, d_in),
    ``B = U_k S_k``, ``A = V_k^T`` (as PEFT / kohya). ``rank=None``: every non-zero singular value (exact).
    ``clamp``: a quantile of the factors' entries at which both are clipped symmetrically."""
    U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=full_matrices, driver=driver)
    if rank is None:
        tol = S.max() * max(delta.shape) * torch.finfo(S.dtype).eps if S.numel() else 0
        rank = max(1, int((S > tol).sum()))
    B, A = U[:, :rank] * S[:rank], Vh[:rank]
    if clamp is not None:
        hi = torch.quantile(torch.cat([B.flatten(), A.flatten()]), clamp)
        B, A = B.clamp(-hi, hi), A.clamp(-hi, hi)
    return A.to(delta.dtype), B.to(delta.dtype)


def cat_factors(As: Sequence[Tensor], Bs: Sequence[Tensor], coefs: Sequence[float]) -> tuple[Tensor, Tensor]:
    """Exact factors of ``sum_i c_i B_i A_i``: ``A = [c_i A_i]`` stacked on rows, ``B = [B_i]`` on columns."""
    return torch.cat([c * A for A, c in zip(As, coefs)], 0), torch.cat(list(Bs), 1)


def _along(stacked: Tensor, weights: Sequence[float]) -> Tensor:
    w = torch.as_tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    return w.reshape(-1, *([1] * (stacked.dim() - 1)))


# -- adapters on a model -------------------------------------------------------------------------------
def add_weighted_adapter(model: Any, adapters: list[str], weights: list[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None, svd_clamp: float | None = None,
                         svd_full_matrices: bool = True, svd_driver: str | None = None,
                         density: float | None = None, majority_sign_method: str = "total") -> None:
    """Add ``adapter_name``: the LoRA adapters ``adapters`` combined with ``weights`` (module docstring)."""
    tuner = getattr(model, "base_model", model)
    configs = tuner.peft_config
    if adapter_name in configs:
        raise ValueError(f"add_weighted_adapter: adapter {adapter_name!r} already exists; pick another name")
    if not adapters or len(adapters) != len(weights):
        raise ValueError(f"add_weighted_adapter: {len(adapters)} adapters but {len(weights)} weights")
    unknown = [a for a in adapters if a not in configs]
    if unknown:
        raise ValueError(f"add_weighted_adapter: unknown adapter(s) {unknown}; adapters: {sorted(configs)}")
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"combination_type: expected one of {COMBINATION_TYPES}, got {combination_type!r}")
    other = {a: configs[a].peft_type for a in adapters if not isinstance(configs[a], LoraConfig)}
    if other:
        raise ValueError(f"add_weighted_adapter merges LoRA adapters only; {other} are other methods")
    params = [a for a in adapters if configs[a].target_parameters]
    if params:  # as peft
        raise ValueError(f"add_weighted_adapter does not support target_parameters (LoRA on nn.Parameters): {params}")
    dora = [a for a in adapters if configs[a].use_dora]
    if dora:
        raise ValueError(f"add_weighted_adapter: DoRA adapters {dora} cannot be combined (magnitude vectors)")
    layers = {a: {p: ad for p, ad in tuner.adapters(a)} for a in adapters}
    first = adapters[0]
    for a in adapters[1:]:
        diff = sorted(set(layers[a]) ^ set(layers[first]))
        if diff:
            raise ValueError(f"add_weighted_adapter: adapters {first!r} and {a!r} target different modules: "
                             f"{diff[:5]}{' ...' if len(diff) > 5 else ''}")
    saved = [(path, w) for path, w in tuner.saved_modules() if sum(a in w.modules_to_save for a in adapters) > 1]
    if saved:
        raise ValueError(f"add_weighted_adapter: more than one of {adapters} trains modules_to_save "
                         f"{[p for p, _ in saved]}; those cannot be merged")
    grouped = sorted({p for a in adapters for p, x in layers[a].items() if getattr(x, "groups", 1) > 1})
    if grouped:  # B is a grouped 1x1 conv: its factors do not form the weight's update (as in PEFT)
        raise ValueError(f"add_weighted_adapter: LoRA on grouped convolutions cannot be merged: {grouped[:5]}")
    if len(adapters) == 1 and combination_type not in ("cat", "linear"):
        combination_type = "linear"  # one adapter: exact (as PEFT)

    factors: dict[str, tuple[Tensor, Tensor]] = {}
    with torch.no_grad():
        for path in layers[first]:
            ads = [layers[a][path] for a in adapters]
            A_shape, B_shape = ads[0].lora_A.shape[1:], ads[0].lora_B.shape[2:]
            if combination_type in ("linear", "cat"):
                A, B = cat_factors([x.lora_A.reshape(x.r, -1) for x in ads],
                                   [x.lora_B.reshape(-1, x.r) for x in ads],
                                   [w * x.scaling for x, w in zip(ads, weights)])
            else:
                deltas = [x.scaling * (x.lora_B.reshape(-1, x.r) @ x.lora_A.reshape(x.r, -1)) for x in ads]
                merged = combine(deltas, weights, combination_type, density, majority_sign_method)
                rank = svd_rank
                if rank is None and combination_type.endswith("svd"):
                    rank = max(x.r for x in ads)
                A, B = svd_factors(merged, rank and min(rank, min(merged.shape)), svd_clamp, svd_full_matrices,
                                   svd_driver)
            factors[path] = (A.reshape(A.shape[0], *A_shape), B.reshape(B.shape[0], B.shape[1], *B_shape))
    ranks = {path: A.shape[0] for path, (A, _) in factors.items()}
    r = max(ranks.values())
    pattern = {re.escape(p): k for p, k in ranks.items() if k != r}
    owners = [(path, w, a) for path, w in tuner.saved_modules() for a in adapters if a in w.modules_to_save]
    keep = configs[owners[0][2]].modules_to_save if owners else None
    config = dataclasses.replace(
        configs[first], r=r, lora_alpha=r, use_rslora=False, init_lora_weights=True, rank_pattern=pattern,
        alpha_pattern=dict(pattern), modules_to_save=keep, inference_mode=True)
    tuner.inject(config, adapter_name)
    with torch.no_grad():
        for path, adapter in tuner.adapters(adapter_name):
            A, B = factors[path]
            adapter.lora_A.copy_(A)
            adapter.lora_B.copy_(B)
        for _, wrapper, a in owners:  # one adapter trained this module in full: the merged adapter keeps it
            wrapper.modules_to_save[adapter_name].load_state_dict(wrapper.modules_to_save[a].state_dict())
    tuner.mark_trainable()
