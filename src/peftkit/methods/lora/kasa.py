"""KaSA, knowledge-aware singular-value adaptation (Wang et al. 2024, arXiv 2412.06071):
``LoraConfig(kasa_config=KasaConfig(...))``.

1. Knowledge-based truncation (once, frozen). With ``W = U S V^T`` (d_out, d_in) and ``k = min(d_in, d_out)``, the
   base weight becomes its rank-``(k - r)`` approximation: its ``r`` smallest ("long-tail", noisy) singular
   components are dropped, ``W' = U[:, :k-r] S[:k-r] V[:, :k-r]^T`` (one float32 SVD; needs ``r < k``).
2. Knowledge-aware singular-value adaptation (trained). The update has SVD form with a learnable diagonal
   ``lora_diag`` (ΔΣ, r values) between the factors:  ``h = W' x + s B diag(ΔΣ) A x``, ``s = alpha / r``.
   A (r, d_in), B (d_out, r) and ΔΣ (r,) train; W' is frozen. B starts at zero (the update is zero at the start),
   ΔΣ at ``randn(r)``; r (d_in + d_out) + r parameters per layer.
3. The paper's regularisers, ``beta ||ΔΣ||^2 + gamma (||B^T B - I||_F + ||A A^T - I||_F)`` (eq. 9-11), are not part
   of the forward: ``kasa_loss(model)`` (peft's ``LoraModel._get_kasa_loss``) returns them for the training loop
   to add, with each adapter's ``KasaConfig.beta`` / ``gamma``.

As peft 0.21.2 (``KasaLinearVariant``): nn.Linear layers only (not GPT-2's Conv1D, embeddings or convolutions);
file key ``<layer>.lora_diag`` beside ``lora_A`` / ``lora_B``; the truncation is destructive: disabling, unloading
or deleting the adapter keeps the truncated weight, merge / unmerge round-trip to it, and every KaSA adapter added
truncates again (loading an adapter file repeats its truncation on the original weight, with the same result). KaSA
and plain LoRA adapters are not mixed on one model (peft's rule). peftkit truncates once every layer of the new
adapter is built (``after_inject``), so a refused target (a Conv1D, ``r >= k``) leaves the model untouched.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import is_int
from ...layers import AdapterLayer, adapter_layers
from ...targeting import pattern_value
from . import dispatch
from .config import LoraConfig
from .layer import LoraAdapter

FIELD = "kasa_config"


# -- the weight math (pure functions) --------------------------------------------------------------------------
def truncate(weight: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
    """(W', dropped U S, dropped V^T): ``W`` without its ``r`` smallest singular components, in ``W``'s dtype (the
    SVD in float32, as peft), and the dropped part's float32 factors."""
    U, S, Vh = torch.linalg.svd(weight.detach().to(torch.float32), full_matrices=False)
    keep = min(weight.shape) - r
    kept = (U[:, :keep] * S[:keep]) @ Vh[:keep, :]
    return kept.to(weight.dtype), U[:, keep:] * S[keep:], Vh[keep:, :]


def kasa_delta(A: Tensor, B: Tensor, diag: Tensor, scaling: float) -> Tensor:
    """``s B diag(ΔΣ) A`` (d_out, d_in), in peft's order of operations (so merges are bit-identical); half
    precision on the CPU is computed in float32, as peft."""
    dtype = B.dtype
    if B.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        A, B, diag = A.float(), B.float(), diag.float()
    return (((B * diag) @ A) * scaling).to(dtype)


def regularization(A: Tensor, B: Tensor, diag: Tensor, beta: float, gamma: float) -> Tensor:
    """``beta sum(ΔΣ^2) + gamma (||B^T B - I||_F + ||A A^T - I||_F)`` in float32 (paper eq. 9-11)."""
    A, B, diag = A.float(), B.float(), diag.float()
    eye = torch.eye(diag.shape[0], device=diag.device, dtype=torch.float32)
    l3 = torch.linalg.norm(B.transpose(-1, -2) @ B - eye) + torch.linalg.norm(A @ A.transpose(-1, -2) - eye)
    return beta * (diag ** 2).sum() + gamma * l3


# -- the adapter -------------------------------------------------------------------------------------------------
class KasaAdapter(LoraAdapter):
    """LoRA with a trained diagonal between its factors on a truncated base weight (see the module doc)."""

    def __init__(self, base: nn.Module, config: Any, key: str = "", init: bool = True) -> None:
        where = key or "a target"
        if not isinstance(base, nn.Linear):
            raise ValueError(f"LoraConfig.kasa_config: KaSA adapts nn.Linear layers only (as peft); {where} is a "
                             f"{type(base).__name__}: leave it out of target_modules")
        r = pattern_value(config.rank_pattern, key, config.r)
        k = min(base.weight.shape)
        if not (is_int(r) and r < k):
            raise ValueError(f"LoraConfig.kasa_config: KaSA needs r < min(in_features, out_features) = {k}, so that "
                             f"the truncated base weight keeps a component; {where} has r={r!r}")
        super().__init__(base, config, key, init=init)
        A = self.lora_A
        self.lora_diag = nn.Parameter(torch.randn(r, device=A.device, dtype=A.dtype))  # peft: randn, B is zero
        self.truncation_pending = True  # done by ``after_inject`` once every layer of the adapter is built

    @property
    def checkpoint_keys(self) -> dict[str, str]:  # type: ignore[override]
        return {**super().checkpoint_keys, "lora_diag": "lora_diag"}

    @classmethod
    def param_count(cls, base: nn.Module, config: Any, key: str = "") -> int:
        """LoRA's ``r (d_in + d_out)`` (+ d_out with lora_bias), + r for ΔΣ."""
        return super().param_count(base, config, key) + pattern_value(config.rank_pattern, key, config.r)

    @torch.no_grad()
    def truncate_base(self, base: nn.Module) -> None:
        weight = base.weight
        kept, _, _ = truncate(weight, self.r)
        weight.data = kept
        self.truncation_pending = False

    # -- weights ---------------------------------------------------------------------------------------------
    def delta_weight(self, base: nn.Module) -> Tensor:
        return kasa_delta(self.lora_A, self.lora_B, self.lora_diag, self.scaling)

    # -- forward ---------------------------------------------------------------------------------------------
    def fused_forward(self, base: nn.Module, x: Tensor) -> Tensor | None:
        return None  # LoRA's fast paths know no diagonal: the reference path below

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        A = self.lora_A
        if x.dtype != A.dtype:
            x = x.to(A.dtype)
        if self.dropout is not None:
            x = self.dropout(x)
        h = F.linear(x, A) * self.lora_diag  # (..., r): diag(ΔΣ) A x
        if self.bias_B is not None or out.dtype != A.dtype:
            return out + (F.linear(h, self.lora_B, self.bias_B) * self.scaling).to(out.dtype)
        return self._accumulate(base, h, out)


# -- model-level rules ------------------------------------------------------------------------------------------
def check_new_adapter(configs: dict[str, Any], config: Any, adapter_name: str) -> None:
    """peft's rule: KaSA changes the base weights, so KaSA and non-KaSA LoRA adapters are not mixed on one model."""
    new = getattr(config, FIELD, None) is not None
    for name, other in configs.items():
        if other is config or not isinstance(other, LoraConfig):
            continue
        if (getattr(other, FIELD, None) is not None) is not new:
            raise ValueError(
                "LoraConfig.kasa_config: KaSA cannot be combined with adapters that don't use KaSA, since KaSA "
                f"modifies the base weights: the new adapter {adapter_name!r} {'uses' if new else 'does not use'} "
                f"KaSA but adapter {name!r} {'does not' if new else 'does'}.")


def after_inject(model: nn.Module, adapter_name: str) -> None:
    """Truncate the base weight of each layer the new KaSA adapter was just built on."""
    for _, layer in adapter_layers(model):
        adapter = layer.adapters[adapter_name] if adapter_name in layer.adapters else None
        if isinstance(adapter, KasaAdapter) and adapter.truncation_pending:
            adapter.truncate_base(layer.base_layer)


def kasa_loss(model: nn.Module, adapter_names: str | list[str] | None = None) -> Tensor | float:
    """peft's ``LoraModel._get_kasa_loss``: the sum over the KaSA layers of ``regularization`` for the named
    adapters (default: the active ones), with each adapter's ``KasaConfig.beta`` / ``gamma``; 0.0 when none."""
    if adapter_names is None:
        adapter_names = list(model.active_adapters)
    elif isinstance(adapter_names, str):
        adapter_names = [adapter_names]
    configs = model.peft_config
    total: Tensor | float = 0.0
    for module in model.modules():
        if not isinstance(module, AdapterLayer):
            continue
        for name in adapter_names:
            adapter = module.adapters[name] if name in module.adapters else None
            if isinstance(adapter, KasaAdapter):
                cfg = configs[name].kasa_config
                total = total + regularization(adapter.lora_A, adapter.lora_B, adapter.lora_diag, cfg.beta,
                                               cfg.gamma)
    return total


dispatch.BY_FIELD[FIELD] = KasaAdapter
dispatch.NEW_ADAPTER_CHECKS.append(check_new_adapter)
dispatch.AFTER_INJECT.append(after_inject)
