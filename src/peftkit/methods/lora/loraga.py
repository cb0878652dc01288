"""LoRA-GA (Wang et al. 2024, arXiv 2407.05000), as Hugging Face PEFT 0.21.2 (``peft.tuners.lora.loraga``).

``preprocess_loraga(model, lora_config, train_step)`` runs ``train_step()`` (forward and backward on a few
batches) with gradients on the targeted Linear / Conv1D weights only, and leaves each layer's mean weight gradient
G on it (``_peft_loraga_grad``). ``get_peft_model`` with ``init_lora_weights="lora_ga"`` then takes the top 2r
singular components of G (randomised SVD): r of them make A (right vectors), r make B (left vectors times
singular values), scaled per ``LoraGAConfig.scale``; the base weight keeps ``W - s B A`` (``data_init.py``), so
the model starts from its own outputs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import Tensor, nn

from . import corda as CD


def _device(model: nn.Module) -> torch.device:
    model = getattr(model, "module", model)
    return next(iter(model.parameters())).device


@torch.no_grad()
def preprocess_loraga(
    model: nn.Module,
    lora_config: Any,
    train_step: Callable[[], None],
    cache_file: Optional[str] = None,
) -> None:
    """Attach the mean gradient of each targeted Linear / Conv1D weight (``_peft_loraga_grad``), peft's API.

    Args:
        model: the model ``get_peft_model`` will adapt next, with this ``lora_config``.
        lora_config: a LoraConfig with ``init_lora_weights="lora_ga"`` and ``lora_ga_config=LoraGAConfig(...)``.
        train_step: runs forward and backward on calibration batches (gradients accumulate over all of them;
            their sum is divided by the number of backward passes through each layer).
        cache_file: read the gradients from this file when it exists, else write them there.
    """
    if lora_config.lora_ga_config is None:
        raise ValueError("If you want to use LoRA-GA, please initialize the LoraConfig with "
                         "init_lora_weights='lora_ga' and lora_ga_config=LoraGAConfig(...).")
    targets = list(CD.target_modules(model, lora_config))
    for name, module in targets:
        if hasattr(module, "quant_state") or not module.weight.is_floating_point():
            raise ValueError(f"LoRA-GA does not support quantized models. Found quantized module: '{name}'. "
                             "LoRA-GA requires full-precision gradients during preprocessing.")
    if cache_file is not None and os.path.exists(cache_file) and os.path.getsize(cache_file) > 0:
        cache = torch.load(cache_file, map_location=_device(model))
        for name, module in targets:
            module._peft_loraga_grad = cache[f"{name}._peft_loraga_grad"]
        return
    estimate_gradients(model, targets, train_step)
    if cache_file is not None:
        os.makedirs(os.path.dirname(cache_file), exist_ok=True)
        torch.save({f"{name}._peft_loraga_grad": m._peft_loraga_grad for name, m in targets
                    if hasattr(m, "_peft_loraga_grad")}, cache_file)


def estimate_gradients(model: nn.Module, targets: list[tuple[str, nn.Module]], train_step: Callable[[], None]) -> None:
    """Run ``train_step`` in train mode with only the targets' weights requiring grad; each target gets its weight's
    accumulated gradient divided by the number of backward passes through it. Training mode, ``requires_grad``
    flags and the targets' ``.grad`` are restored."""
    if not targets:
        raise ValueError("No supported layers found for LoRA-GA initialization. LoRA-GA only supports nn.Linear and "
                         "Conv1D layers. Please ensure your model contains at least one of these layer types in "
                         "target_modules.")
    was_training = model.training
    model.train()
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    counts = {id(m): 0 for _, m in targets}

    def count(module: nn.Module, grad_input: Any, grad_output: Any) -> None:
        counts[id(module)] += 1

    handles = []
    try:
        for p in model.parameters():
            p.requires_grad = False
        for _, module in targets:
            module.weight.requires_grad = True
            handles.append(module.register_full_backward_hook(count))
        with torch.enable_grad():
            train_step()
    finally:
        for handle in handles:
            handle.remove()
        for name, p in model.named_parameters():
            if name in flags:
                p.requires_grad = flags[name]
        model.train(was_training)
    for _, module in targets:
        if counts[id(module)] > 0 and module.weight.grad is not None:
            module._peft_loraga_grad = module.weight.grad.detach() / counts[id(module)]
        module.weight.grad = None


@torch.no_grad()
def loraga_factors(grad: Tensor, weight: Tensor, r: int, scaling: float, cfg: Any,
                   out_features: int | None = None) -> tuple[Tensor, Tensor]:
    """A (r, d_in) and B (d_out, r) from the float32 (d_out, d_in) gradient ``grad`` (peft's ``lora_ga_init``:
    ``torch.svd_lowrank`` with q = min(4r, min(shape)), 4 iterations, on the default generator; "random" draws
    its indices after it, "weight_svd" runs a second ``svd_lowrank`` on ``weight``, the float32 (d_out, d_in) base
    weight). ``out_features``: the "stable" scale's d, peft's ``weight.shape[0]`` of the stored weight (for GPT-2's
    Conv1D that is d_in; default ``weight.shape[0]``)."""
    U, S, V = torch.svd_lowrank(grad, q=min(4 * r, min(grad.shape)), niter=4)
    Vh = V.t()
    U, S, Vh = U[:, : 2 * r], S[: 2 * r], Vh[: 2 * r, :]
    direction = cfg.direction
    if direction == "ArBr":  # A: odd components, B: even ones
        A, B, S_B = Vh[1: 2 * r: 2, :], U[:, 0: 2 * r: 2], S[0: 2 * r: 2]
    elif direction == "A2rBr":
        A, B, S_B = Vh[r: 2 * r, :], U[:, :r], S[:r]
    elif direction == "ArB2r":
        A, B, S_B = Vh[:r, :], U[:, r: 2 * r], S[r: 2 * r]
    elif direction == "random":
        indices = torch.randperm(2 * r)[:r]
        A, B, S_B = Vh[indices, :], U[:, indices], S[indices]
    else:
        raise ValueError(f"LoraGAConfig.direction: unknown {direction!r}")
    B = B @ torch.diag(S_B)
    if cfg.scale == "stable":
        d = weight.shape[0] if out_features is None else out_features
        B = B * ((d ** 0.25) / (cfg.stable_gamma ** 0.5))
    elif cfg.scale == "weight_svd":
        _, weight_S, _ = torch.svd_lowrank(weight, q=r, niter=4)
        if S_B[0] > 0:
            B = B * (weight_S[0] / S_B[0])
    elif cfg.scale == "gd_scale":
        A, B = A / scaling, B / scaling
    return A, B


__all__ = ["preprocess_loraga"]
