"""Any mergeable adapter as a LoRA (peft's ``convert_to_lora`` / ``save_as_lora``): serve LoHa, LoKr, OFT,
(IA)3, VeRA, FourierFT or a selective adapter where only LoRA loads (vLLM, SGLang, LoRAX, diffusers).

Per adapted layer: the adapter's weight update ``dW = merge(W0) - W0`` (exact for every mergeable method,
additive or multiplicative: the base is fixed), then its truncated SVD ``dW ~ U_k S_k V_k^T`` gives
``B = U_k S_k`` (d_out, k) and ``A = V_k^T`` (k, d_in), with ``lora_alpha = r`` so the scale is 1. The Eckart-Young
error ``||dW - B A||_F / ||dW||_F`` is the best any rank-k LoRA can do; it falls to 0 as k reaches the rank of
``dW``. ``rank`` an int: k for every layer; a float in (0, 1]: per layer the smallest k whose singular values
hold that fraction of ``||dW||_F^2`` (peft's energy threshold; the ranks go to ``rank_pattern``).

As peft 0.21.2: the same keys, config and numbers (for the methods both convert: LoRA, LoHa, LoKr, VeRA,
FourierFT), ``A`` / ``B`` swapped and transposed on a GPT-2 ``Conv1D``. Beyond peft: every mergeable peftkit
method converts (its merge defines ``dW``), convolutions convert (``A`` (k, c_in, *kernel), ``B`` (c_out, k, 1,
...)), a bias the adapter changes becomes LoRA's ``lora_B.bias`` (``lora_bias=True``) instead of an error, and
``return_errors=True`` also returns each layer's relative error.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from ...checkpoint import commit_save
from ...kernel_helpers import is_transposed
from ...layers import AdapterLayer
from ...registry import get_method
from ...saved_modules import ModulesToSaveWrapper
from .config import LoraConfig

PEFT_PREFIX = "base_model.model."
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def energy_rank(singular_values: Tensor, threshold: float) -> int:
    """The smallest k whose first k singular values hold ``threshold`` of the total energy (sum of squares)."""
    energy = torch.cumsum(singular_values.double() ** 2, dim=0)
    return int(torch.searchsorted(energy, threshold * energy[-1]).item()) + 1


def low_rank_factors(delta: Tensor, rank: int | float) -> tuple[Tensor, Tensor, int, float]:
    """(A (k, d_in), B (d_out, k), k, relative Frobenius error) of a 2-D update ``delta`` (truncated SVD)."""
    dtype = delta.dtype
    U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=False)
    k = rank if isinstance(rank, int) else energy_rank(S, rank)
    if k > S.shape[0]:
        raise ValueError(f"convert_to_lora: rank {k} is larger than the weight allows ({S.shape[0]}); choose a lower "
                         "rank")
    total = float(S.double().square().sum())
    error = (float(S[k:].double().square().sum()) / total) ** 0.5 if total > 0 else 0.0
    return Vh[:k].to(dtype).contiguous(), (U[:, :k] * S[:k]).to(dtype).contiguous(), k, error


@torch.no_grad()
def _update(layer: AdapterLayer, adapter_name: str) -> tuple[Tensor, Tensor | None]:
    """The weight update (base weight's layout) and the bias update (None when the bias is unchanged)."""
    adapter, base = layer.adapters[adapter_name], layer.base_layer
    weight = base.weight.detach()
    delta = adapter.merge(base, weight.clone())[0] - weight
    bias = None
    if "bias" in adapter.merged_params:
        old = getattr(base, "bias", None)
        old = old.detach() if old is not None else adapter.missing_param(base, "bias")
        if old is not None:
            new = adapter.merge_param(base, "bias", old.clone())
            bias = new - old if not torch.equal(new, old) else None
    return delta, bias


def _check(model: nn.Module, adapter_name: str, rank: int | float) -> list[tuple[str, AdapterLayer]]:
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise TypeError(f"convert_to_lora: rank must be an int or a float threshold, got {rank!r}")
    if isinstance(rank, float) and not 0 < rank <= 1:
        raise ValueError(f"convert_to_lora: a float rank is an energy threshold in (0, 1], got {rank}")
    if isinstance(rank, int) and rank < 1:
        raise ValueError(f"convert_to_lora: rank must be >= 1, got {rank}")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLayer) and adapter_name in m.adapters]
    if not layers:
        raise TypeError(f"convert_to_lora: no layer of this model holds an adapter named {adapter_name!r}")
    configs = getattr(model, "peft_config", {}) or {}
    config = configs.get(adapter_name)
    if config is not None and (config.is_prompt_learning or not get_method(config).mergeable):
        raise TypeError(f"convert_to_lora: {type(config).__name__} is not a weight update (not mergeable), so it has "
                        "no LoRA form")
    bad = sorted({type(m.base_layer).__name__ for _, m in layers
                  if not (isinstance(m.base_layer, (nn.Linear, *_CONV)) or is_transposed(m.base_layer))
                  or getattr(m.base_layer, "groups", 1) != 1})
    if bad:
        raise TypeError(f"convert_to_lora: layers of type {', '.join(bad)} have no LoRA conversion (Linear, GPT-2 "
                        "Conv1D and ungrouped Conv1d/2d/3d have)")
    return layers


def convert_to_lora(model: nn.Module, rank: int | float, adapter_name: str = "default", progressbar: bool = False,
                    compile_kwargs: dict | None = None, return_errors: bool = False) -> Any:
    """``(LoraConfig, state_dict)`` approximating adapter ``adapter_name`` of ``model`` (a PeftModel or a model with
    adapters injected in place); with ``return_errors``, also ``{layer: ||dW - B A||_F / ||dW||_F}``. The state
    dict's keys are peft's (``<module path>.lora_A.weight``); ``progressbar`` / ``compile_kwargs`` are accepted
    for peft's signature (the conversion is one SVD per layer)."""
    layers = _check(model, adapter_name, rank)
    config = (getattr(model, "peft_config", {}) or {}).get(adapter_name)
    if config is not None and type(config) is LoraConfig:
        warnings.warn("Converting a PEFT adapter to LoRA that is already a LoRA adapter. There is typically no need "
                      "for that.", stacklevel=2)
    kwargs: dict[str, Any] = {"rank_pattern": {}, "alpha_pattern": {}, "exclude_modules": set()}
    if config is not None:
        kwargs["target_modules"] = copy.copy(getattr(config, "target_modules", None))
        kwargs["base_model_name_or_path"] = config.base_model_name_or_path
        if hasattr(config, "layers_pattern"):
            kwargs["layers_pattern"] = config.layers_pattern
            kwargs["layers_to_transform"] = config.layers_to_transform
    else:
        kwargs["target_modules"] = set()
    if isinstance(kwargs["target_modules"], list):
        kwargs["target_modules"] = set(kwargs["target_modules"])
    r = rank if isinstance(rank, int) else 1  # a threshold's ranks all go to rank_pattern
    lora_config = LoraConfig(r=r, lora_alpha=r, **kwargs)
    state: dict[str, Tensor] = {}
    errors: dict[str, float] = {}
    for name, layer in layers:
        short = name.removeprefix(PEFT_PREFIX)
        base = layer.base_layer
        delta, bias = _update(layer, adapter_name)
        transposed = is_transposed(base)
        flat = delta.t() if transposed else delta.reshape(delta.shape[0], -1)  # (d_out, d_in * prod(kernel))
        A, B, k, errors[short] = low_rank_factors(flat.t() if transposed else flat, rank)
        if transposed:  # peft: the SVD of the (d_in, d_out) layout, factors swapped and transposed
            A, B = B.t().contiguous(), A.t().contiguous()
        if isinstance(base, _CONV):
            A = A.reshape(k, *delta.shape[1:])
            B = B.reshape(*B.shape, *([1] * (delta.dim() - 2)))
        if k != rank or isinstance(lora_config.target_modules, str):
            lora_config.rank_pattern[short] = k
            lora_config.alpha_pattern[short] = k
        else:
            lora_config.target_modules.add(short)
        state[f"{name}.lora_A.weight"] = A
        state[f"{name}.lora_B.weight"] = B
        if bias is not None:
            lora_config.lora_bias = True
            state[f"{name}.lora_B.bias"] = bias
    if lora_config.lora_bias:  # every converted layer then has a bias in the file (zeros where unchanged)
        for name, layer in layers:
            b = state[f"{name}.lora_B.weight"]
            state.setdefault(f"{name}.lora_B.bias", b.new_zeros(b.shape[0]))
    if config is not None and getattr(config, "modules_to_save", None):  # trained in full: copied as they are
        lora_config.modules_to_save = copy.copy(config.modules_to_save)
        for name, wrapper in model.named_modules():
            if isinstance(wrapper, ModulesToSaveWrapper) and adapter_name in wrapper.modules_to_save:
                for pname, param in wrapper.modules_to_save[adapter_name].named_parameters():
                    state[f"{name}.{pname}"] = param.detach()
    return (lora_config, state, errors) if return_errors else (lora_config, state)


def save_as_lora(path: str | os.PathLike, model: nn.Module, rank: int | float, adapter_name: str = "default",
                 progressbar: bool = False, compile_kwargs: dict | None = None) -> dict[str, float]:
    """``convert_to_lora``, then write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``path``
    (together, atomically), loadable by ``PeftModel.from_pretrained`` of peftkit or peft. Returns the relative
    error of each layer."""
    config, state, errors = convert_to_lora(model, rank, adapter_name, return_errors=True)
    os.makedirs(path, exist_ok=True)
    text = json.dumps(config.to_dict(), indent=2, sort_keys=True)
    commit_save({"tensors": {k: v.contiguous() for k, v in state.items()}, "config": text, "safe": True}, os.fspath(path))
    return errors
