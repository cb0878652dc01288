"""Intruder-dimension mitigation (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence",
arXiv 2410.21228), peft 0.21.2's ``peft.tuners.lora.intruders.reduce_intruder_dimension``.

A trained LoRA adapter adds *intruder dimensions*: top singular vectors of ``W + ΔW`` nearly orthogonal to every
singular vector of the pre-trained ``W``; they carry much of the forgetting. Per layer, with ``W = U S V^T`` and
``W + ΔW = U' S' V'^T``:

1. ``c_i = max_j |<u'_i, u_j>|``; among the ``top_k`` largest components of ``W + ΔW`` the intruders are
   ``I = {i < top_k : c_i < threshold_epsilon}``.
2. They are scaled down by ``mitigation_lambda``: ``W_m = W + ΔW + (λ - 1) U'_I S'_I V'_I^T``.
3. ``(W_m - W) / s`` (s: the adapter's scaling) is refactored by SVD into rank ``r`` again, the singular values
   split evenly: ``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) V_r^T``.

The result is a new adapter ``new_adapter_name`` (the old one's config), made active; layers without intruders get
the old factors unchanged. SVDs run in float32 for half-precision weights and the factors are rounded to the base
weight's dtype, as peft. Deliberate differences from peft: an embedding's or GPT-2 Conv1D's factors are stored in
its own layout (peft writes the Linear layout there, which breaks those layers when d_in != d_out); convolutions,
``target_parameters`` and KaSA adapters are refused (peft has no meaningful result for them: a 4-D SVD, no
``get_delta_weight`` of a parameter, a second truncation of the base).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ...layers import AdapterLayer
from .layer import LoraAdapter


def intruder_components(W: Tensor, merged: Tensor, top_k: int, threshold_epsilon: float) -> list[int]:
    """Indices ``i < top_k`` of the singular components of ``merged`` whose left vector has cosine similarity below
    ``threshold_epsilon`` with every left singular vector of ``W``."""
    U_base = torch.linalg.svd(W, full_matrices=False)[0]
    U_merged = torch.linalg.svd(merged, full_matrices=False)[0]
    cos_sim = (U_merged.T @ U_base).abs().max(dim=1).values
    return torch.where(cos_sim[:top_k] < threshold_epsilon)[0].tolist()


def mitigated_factors(W: Tensor, merged: Tensor, intruders: list[int], mitigation_lambda: float, scaling: float,
                      r: int) -> tuple[Tensor, Tensor]:
    """(B, A) of rank ``r`` with ``s B A = W_m - W`` (best rank-r fit), ``W_m`` the merged weight ``W + ΔW`` with
    its intruder components scaled by ``mitigation_lambda`` (peft's operations, in order)."""
    U, S, Vh = torch.linalg.svd(merged, full_matrices=False)
    B_intruder = U[:, intruders] @ torch.diag(S)[intruders, :].sqrt()
    A_intruder = (torch.diag(S)[:, intruders]).sqrt() @ Vh[intruders, :]
    mitigated = merged + (mitigation_lambda - 1) * (B_intruder @ A_intruder)
    delta = mitigated - W
    delta /= scaling
    U_d, S_d, Vh_d = torch.linalg.svd(delta, full_matrices=False)
    return U_d[:, :r] @ torch.diag(S_d[:r]).sqrt(), torch.diag(S_d[:r]).sqrt() @ Vh_d[:r]


def _check(model: Any, old: str) -> None:
    config = model.peft_config.get(old)
    if config is None:
        raise ValueError(f"reduce_intruder_dimension: no adapter named {old!r}; adapters: {sorted(model.peft_config)}")
    if str(getattr(config.peft_type, "value", config.peft_type)) != "LORA":
        raise ValueError("The provided model is not using LoRA and is therefore not supported.")
    if getattr(config, "kasa_config", None) is not None or getattr(config, "target_parameters", None):
        raise ValueError("reduce_intruder_dimension: not supported for KaSA adapters or target_parameters (a new "
                         "adapter would truncate the base again / the parameters have no layer delta)")
    for _, layer in model.base_model.adapter_layers():
        adapter = layer.adapters[old] if old in layer.adapters else None
        if adapter is not None and (not isinstance(adapter, LoraAdapter) or adapter.kind == "conv"):
            raise ValueError(f"reduce_intruder_dimension: supports LoRA on Linear, Conv1D and Embedding layers; "
                             f"adapter {old!r} has a {type(adapter).__name__} on a {type(layer.base_layer).__name__}")


@torch.no_grad()
def reduce_intruder_dimension(peft_model: Any, old_adapter_name: str = "default",
                              new_adapter_name: str = "intruder_reduced", top_k: int = 10,
                              threshold_epsilon: float = 0.5, mitigation_lambda: float = 0.75,
                              logging_sink: Callable[..., Any] | None = print) -> None:
    """Add ``new_adapter_name``: adapter ``old_adapter_name`` with its intruder dimensions reduced (module doc), and
    make it the active adapter (``peft_model.set_adapter(old_adapter_name)`` goes back)."""
    sink = logging_sink if logging_sink is not None else (lambda *a, **k: None)
    _check(peft_model, old_adapter_name)
    peft_model.add_adapter(new_adapter_name, peft_model.peft_config[old_adapter_name])
    for layer_name, layer in peft_model.named_modules():
        if not isinstance(layer, AdapterLayer) or old_adapter_name not in layer.adapters:
            continue
        old, new = layer.adapters[old_adapter_name], layer.adapters[new_adapter_name]
        base = layer.base_layer
        W = base.weight.data
        merged = W + LoraAdapter.delta_weight(old, base)  # peft's get_delta_weight: s B A, never DoRA's scale
        transposed = old._out_axis == 1  # embedding / Conv1D: the weight holds (d_in, d_out)
        W_dtype = W.dtype
        if W_dtype in (torch.float16, torch.bfloat16):  # no half-precision SVD: float32, as peft
            W, merged = W.float(), merged.float()
        intruders = intruder_components(W, merged, top_k, threshold_epsilon)
        if not intruders:
            sink(f"{layer_name}: No intruders")
            new.lora_A.copy_(old.lora_A)
            new.lora_B.copy_(old.lora_B)
            continue
        sink(f"{layer_name}: Intruders: {len(intruders)}")
        B, A = mitigated_factors(W, merged, intruders, mitigation_lambda, old.scaling, old.r)
        B, A = B.to(W_dtype), A.to(W_dtype)
        if transposed:  # s (B A)^T is the delta in this layout: A' = (that B)^T, B' = (that A)^T
            B, A = A.t(), B.t()
        new.lora_A.copy_(A.reshape(new.lora_A.shape))
        new.lora_B.copy_(B.reshape(new.lora_B.shape))
    sink(f"Enabling new adapter {new_adapter_name}")
    peft_model.set_adapter(new_adapter_name)
