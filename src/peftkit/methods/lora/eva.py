"""EVA, Explained Variance Adaptation (Paischer et al. 2024, arXiv 2410.07170), as Hugging Face PEFT 0.21.2
(``peft.tuners.lora.eva``), with its signatures.

``get_eva_state_dict(model, dataloader, ...)`` runs the model (adapters off) on batches of calibration data and
fits an incremental PCA of each adapted Linear / Conv1D layer's inputs (padding left out through the attention
mask and, with ``use_label_mask``, the labels) until the components a layer needs have converged (cosine
similarity >= ``tau`` between two steps). Ranks are redistributed over layers by explained variance: the budget
is the sum of the configured ranks, a layer gets at most ``round(r * rho)``, layers with equal inputs are
computed once. ``initialize_lora_eva_weights(model, dataloader)`` writes the result: lora_A = the layer's top
right-singular vectors, lora_B stays zero (the model keeps its outputs), ranks (and, with
``adjust_scaling_factors``, alphas) change in place and are recorded in the config's ``rank_pattern`` /
``alpha_pattern``; a layer given rank 0 loses its adapter.

peftkit whitens (``whiten=True``) each layer's own copy of the components: peft divides them in place, so where
layers share inputs (and so one PCA) the second of them is divided twice; otherwise the numerics are peft's.
"""

from __future__ import annotations

import copy as _copy
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from copy import deepcopy
from itertools import cycle
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ...kernel_helpers import CONV1D_TYPES
from ...layers import AdapterLayer
from ...registry import get_method
from ...targeting import pattern_value
from .eva_inputs import (  # noqa: F401  (peft has them in peft.tuners.lora.eva)
    forward_fn_dict, get_device_with_meta_params, move_inputs_to_device, prepare_layer_inputs_fn_language_modeling,
    prepare_model_inputs_fn_language_modeling)
from .eva_hooks import SVDHook, _equal_groups, _InputsHook
from .layer import LoraAdapter

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - tqdm comes with transformers
    tqdm = None

MIN_TARGET_MODULES_FOR_OPTIMIZATION = 20  # peft's: from this many, target_modules is condensed to suffixes


# -- the SVD -----------------------------------------------------------------------------------------------
def _rank_distribution(hooks: dict, layer_hook_map: dict, equal_inputs_map: dict, rank_budget: int,
                       max_components: dict) -> dict[str, int]:
    """The ``rank_budget`` largest explained-variance ratios over all layers (each layer's first
    ``max_components``) decide each layer's rank; of layers with equal inputs the computed one gets the largest."""
    exp_vars = {k: h[0].svd.explained_variance_ratio_[: max_components[k]] for k, h in hooks.items()}
    keys, values = zip(*[(k, c) for k, name in layer_hook_map.items() for c in exp_vars[name]])
    idx = torch.stack(values).argsort(descending=True)
    counts = Counter([keys[i] for i in idx[:rank_budget]])
    counts = {k: counts.get(k, 0) for k in layer_hook_map.keys()}
    for k, k_hook in equal_inputs_map.items():
        rank, rank_hook = counts[k], counts[k_hook]
        if rank_hook >= rank:
            continue
        counts[k_hook], counts[k] = rank, rank_hook
    return counts


def _get_eva_state_dict(model: nn.Module, dataloader: Iterable, peft_config: Any, target_module_check_fn: Callable,
                        forward_fn: Optional[Callable], prepare_model_inputs_fn: Optional[Callable],
                        prepare_layer_inputs_fn: Union[Callable, dict[str, Callable], None],
                        gather_distributed_inputs: bool, show_progress_bar: bool) -> dict[str, Tensor]:
    if len(dataloader) == 0:
        raise ValueError("dataloader is empty")
    if peft_config.eva_config is None:
        raise ValueError("get_eva_state_dict: peft_config.eva_config is None; use a LoraConfig with "
                         "init_lora_weights='eva' (which sets the default EvaConfig) or pass eva_config=EvaConfig()")
    if dist.is_initialized() and gather_distributed_inputs:
        warnings.warn("torch.distributed is initialized and `gather_distributed_inputs` is True, therefore EVA "
                      "initialization will gather tensors from all ranks. Ensure the model does not receive the same "
                      "inputs on different ranks.", stacklevel=3)
    rho = peft_config.eva_config.rho
    if rho > 1000:  # an upper limit for unusually high values
        rho = min(rho, max(max(p.shape) for p in model.parameters()) // peft_config.r)

    training = model.training
    device = get_device_with_meta_params(model)
    model.eval()
    handles: list[Any] = []
    try:
        return _fit(model, dataloader, peft_config, target_module_check_fn, forward_fn, prepare_model_inputs_fn,
                    prepare_layer_inputs_fn, gather_distributed_inputs, show_progress_bar, rho, device, handles)
    finally:
        for handle in handles:
            handle.remove()
        model.train(training)


def _fit(model, dataloader, peft_config, target_module_check_fn, forward_fn, prepare_model_inputs_fn,
         prepare_layer_inputs_fn, gather_distributed_inputs, show_progress_bar, rho, device, handles):
    def model_inputs(inputs: Any) -> Any:
        if prepare_model_inputs_fn is not None:
            return prepare_model_inputs_fn(inputs, peft_config)
        return deepcopy(inputs)

    inputs = next(iter(dataloader))
    if device is not None:
        inputs = move_inputs_to_device(inputs, device)
    hook_inputs = model_inputs(inputs)
    layer_fns = dict(prepare_layer_inputs_fn) if isinstance(prepare_layer_inputs_fn, Mapping) else None

    first: dict[str, _InputsHook] = {}
    max_components: dict[str, int] = {}
    rank_budget = 0
    for name, module in model.named_modules():
        if not target_module_check_fn(name, module):
            continue
        fn = layer_fns.pop(name, None) if layer_fns is not None else prepare_layer_inputs_fn
        hook = _InputsHook(name=name, prepare_layer_inputs_fn=fn, gather_distributed_inputs=gather_distributed_inputs)
        hook.model_input = hook_inputs
        handles.append(module.register_forward_hook(hook))
        first[name] = hook
        layer_rank = pattern_value(peft_config.rank_pattern, name, peft_config.r)
        max_components[name] = round(layer_rank * rho)
        rank_budget += layer_rank
    if layer_fns:
        raise ValueError("prepare_layer_inputs_fn is a mapping but the following module names were not found in the "
                         f"model: {layer_fns.keys()}")
    if not first:
        raise ValueError("EVA found no layer to initialise: no LoRA layer on an nn.Linear / Conv1D (a PeftModel) or no "
                         "Linear / Conv1D matching peft_config.target_modules (a plain model)")

    # one forward to find layers that see the same input: their SVD is computed once
    forward_fn(model, inputs)
    for handle in handles:
        handle.remove()
    handles.clear()
    missing = [n for n, h in first.items() if not h.inputs]
    if missing:
        raise ValueError(f"EVA: layers {missing[:5]} received no input in the first forward pass; EVA needs every "
                         "targeted layer to run on the calibration data")
    equal_inputs = _equal_groups({n: h.inputs[0] for n, h in first.items()})
    equal_inputs_map = {vv: v[0] for v in equal_inputs for vv in v[1:]}
    for names in equal_inputs:
        top = max(max_components[n] for n in names)
        for n in names:
            max_components[n] = top

    hooks: dict[str, list] = {}  # name -> [SVDHook, handle or None]
    for name, old in first.items():
        if name in equal_inputs_map:
            continue
        hook = SVDHook(n_components=max_components[name], sim_thresh=peft_config.eva_config.tau, name=name,
                       prepare_layer_inputs_fn=old._prepare_layer_inputs_fn,
                       gather_distributed_inputs=gather_distributed_inputs)
        handle = model.get_submodule(name).register_forward_hook(hook)
        handles.append(handle)
        hooks[name] = [hook, handle]
    layer_hook_map = {**dict(zip(hooks.keys(), hooks.keys())), **equal_inputs_map}

    show = show_progress_bar and tqdm is not None and (not dist.is_initialized() or dist.get_rank() == 0)
    batches = tqdm(cycle(dataloader), position=0, leave=False) if show else cycle(dataloader)
    convergence = {k: False for k in hooks}
    rank_dist = max_components.copy()
    for inputs in batches:
        if device is not None:
            inputs = move_inputs_to_device(inputs, device)
        hook_inputs = model_inputs(inputs)
        for name, entry in hooks.items():
            hook, handle = entry
            converged = torch.all(hook.converged[: rank_dist[name]])
            if not convergence[name] and converged and handle:  # converged in this step: stop computing
                handle.remove()
                entry[1] = None
                convergence[name] = True
                continue
            if convergence[name] and not converged:  # the layer needs more components now: resume
                entry[1] = model.get_submodule(name).register_forward_hook(hook)
                handles.append(entry[1])
                convergence[name] = False
            hook.model_input = hook_inputs
        if show:
            done = list(convergence.values()) + [convergence[v] for v in equal_inputs_map.values()]
            batches.set_description(f"{sum(done)}/{len(done)} layers have converged")
        if all(convergence.values()):
            break
        forward_fn(model, inputs)
        if not all(hasattr(h[0].svd, "components_") for h in hooks.values()):
            continue  # some layer had fewer items than components in every batch so far
        rank_dist = _rank_distribution(hooks, layer_hook_map, equal_inputs_map, rank_budget, max_components)

    eva_state_dict = {}
    for name, rank in rank_dist.items():
        hook = hooks[layer_hook_map[name]][0]
        if not torch.all(hook.converged[:rank]):
            raise ValueError(f"Layer {name} has not converged but was assigned rank {rank}.")
        u = hook.svd.components_[:rank].clone()
        if peft_config.eva_config.whiten:
            u /= hook.svd.singular_values_[:rank].sqrt().reshape(-1, 1)
        eva_state_dict[name] = u
    if device is not None:
        eva_state_dict = {k: v.to(device) for k, v in eva_state_dict.items()}
    return eva_state_dict


def _is_eva_layer(module: nn.Module, adapter_name: str | None = None) -> bool:
    """An adapter layer whose LoRA adapter (``adapter_name``, or any) sits on an nn.Linear / Conv1D (EVA leaves
    embeddings, convolutions and attention modules alone, as peft)."""
    if not isinstance(module, AdapterLayer) or not isinstance(module.base_layer, (nn.Linear, *CONV1D_TYPES)):
        return False
    names = [adapter_name] if adapter_name is not None else list(module.adapters)
    return any(type(module.adapters[n]) is LoraAdapter and module.adapters[n].kind == "linear"
               for n in names if n in module.adapters)


@torch.no_grad()
def get_eva_state_dict(
    model: nn.Module,
    dataloader: Iterable,
    peft_config: Optional[Any] = None,
    forward_fn: Optional[Callable] = forward_fn_dict,
    prepare_model_inputs_fn: Optional[Callable] = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Union[Callable, dict[str, Callable], None] = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
) -> dict[str, Tensor]:
    """EVA's A for each layer: ``{module name: (rank, d_in) tensor}`` (peft's signature and defaults).

    ``model``: a PeftModel (its LoRA layers on Linear / Conv1D, adapters off while it runs) or a plain model with
    ``peft_config`` (its Linear / Conv1D layers ``target_modules`` selects). ``dataloader``: batches (sized;
    cycled until every layer converged) that ``forward_fn(model, batch)`` runs (default ``model(**batch)``).
    ``prepare_model_inputs_fn(batch, peft_config)`` / ``prepare_layer_inputs_fn(layer_input, prepared, name)``
    (or a dict name -> function) choose the items of each layer's input for the SVD (default: tokens the attention
    mask and the label mask keep)."""
    is_peft_model = hasattr(model, "peft_config")
    if is_peft_model and peft_config is None:
        peft_config = model.peft_config[adapter_name]
    elif peft_config is None:
        raise ValueError("peft_config is required if model is not a PeftModel")
    if is_peft_model:
        ctx = model.disable_adapter()

        def check(name: str, module: nn.Module) -> bool:
            return _is_eva_layer(module)
    else:
        ctx = nullcontext()
        targets = None
        if peft_config.target_modules is not None:
            named = list(model.named_modules())
            targets = set(get_method(peft_config).adapter_cls.select_targets(model, named, peft_config))

        def check(name: str, module: nn.Module) -> bool:
            return isinstance(module, (nn.Linear, *CONV1D_TYPES)) and (targets is None or name in targets)
    with ctx:
        return _get_eva_state_dict(model, dataloader, peft_config, check, forward_fn, prepare_model_inputs_fn,
                                   prepare_layer_inputs_fn, gather_distributed_inputs, show_progress_bar)


# -- writing it into the model -------------------------------------------------------------------------------
def _find_minimal_target_modules(target_modules: Iterable[str], other_module_names: Iterable[str]) -> set[str]:
    """peft's: the fewest name suffixes that select ``target_modules`` and none of ``other_module_names``."""
    targets, others = set(target_modules), set(other_module_names)

    def suffixes(s: str) -> list[str]:
        parts = s.split(".")
        return [".".join(parts[i:]) for i in range(len(parts))][::-1]

    other_suffixes = {x for item in others for x in suffixes(item)}
    required: set[str] = set()
    for item, sfx in sorted({t: suffixes(t) for t in targets}.items(), key=lambda kv: kv[1]):
        for suffix in sfx:
            if suffix in required or suffix in other_suffixes:
                continue
            if not any(item.endswith("." + req) for req in required):
                required.add(suffix)
                break
    return required or targets


def _rebuild(layer: AdapterLayer, adapter_name: str, config: Any, key: str, r: int, alpha: float,
             init: Any) -> LoraAdapter:
    """A new LoRA adapter of rank ``r`` and alpha ``alpha`` in place of the layer's ``adapter_name``."""
    cfg = _copy.copy(config)
    cfg.r, cfg.lora_alpha, cfg.rank_pattern, cfg.alpha_pattern, cfg.init_lora_weights = r, alpha, {}, {}, init
    old = layer.adapters[adapter_name]
    new = LoraAdapter(layer.base_layer, cfg, key, init=True)
    new.train(old.training)
    layer.adapters[adapter_name] = new
    return new


def _load_eva_state_dict(model: nn.Module, eva_state_dict: dict, adapter_name: str) -> None:
    config = model.peft_config[adapter_name]
    tuner = model.base_model
    eva_state_dict = dict(eva_state_dict)
    missing, new_targets, others = [], [], []
    rank_pattern, alpha_pattern = {}, {}
    for name, module in list(model.named_modules()):
        short = name.replace("base_model.model.", "")
        own = module.adapters[adapter_name] if isinstance(module, AdapterLayer) and adapter_name in module.adapters \
            else None
        if not isinstance(own, LoraAdapter):
            others.append(short)  # peft: every module but its LoRA layers
            continue
        r = pattern_value(config.rank_pattern, name, config.r)
        alpha = pattern_value(config.alpha_pattern, name, config.lora_alpha)
        key = name if name in eva_state_dict else short if short in eva_state_dict else None
        if key is not None:
            w = eva_state_dict.pop(key)
            new_rank = w.size(0)
            if new_rank == 0:  # no component made the budget: the layer loses its adapter
                module.remove(adapter_name)
                if not len(module.adapters):
                    parent, _, child = name.rpartition(".")
                    setattr(model.get_submodule(parent), child, module.base_layer)
                continue
            if new_rank != r and config.eva_config.adjust_scaling_factors:
                alpha *= new_rank / r
            adapter = module.adapters[adapter_name]
            if new_rank != r or adapter.lora_A.is_meta:
                adapter = _rebuild(module, adapter_name, config, short, new_rank, alpha, "eva")
            adapter.lora_A.copy_(w.to(adapter.lora_A.dtype))
            new_targets.append(short)
        else:
            _rebuild(module, adapter_name, config, short, r, alpha, True)
            missing.append(short)
            new_rank = r
        if new_rank != config.r:
            rank_pattern[short] = new_rank
        if alpha != config.lora_alpha:
            alpha_pattern[short] = alpha
    new_targets = new_targets + missing
    if len(new_targets) >= MIN_TARGET_MODULES_FOR_OPTIMIZATION:
        new_targets = _find_minimal_target_modules(new_targets, others)
    config.target_modules = set(new_targets)
    config.rank_pattern = rank_pattern
    config.alpha_pattern = alpha_pattern
    tuner.set_adapter(list(tuner.active_adapters))  # the new adapters: active and trainable as the old ones
    if missing:
        warnings.warn("the following layers were initialized with init_lora_weights=True because they were not found "
                      f"in the eva state_dict: {missing}\ncurrently the following lora modules are not supported by "
                      "EVA: embeddings, convolutions, nn.MultiheadAttention", stacklevel=3)


@torch.no_grad()
def initialize_lora_eva_weights(
    model: nn.Module,
    dataloader: Optional[Iterable] = None,
    eva_state_dict: Optional[dict] = None,
    forward_fn: Optional[Callable] = forward_fn_dict,
    prepare_model_inputs_fn: Optional[Callable] = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Union[Callable, dict[str, Callable], None] = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
) -> nn.Module:
    """Initialise the PeftModel's EVA adapter (``init_lora_weights="eva"``) from ``dataloader`` (or a precomputed
    ``eva_state_dict``): lora_A, ranks and alphas as ``get_eva_state_dict`` finds them (peft's signature).
    Every check runs before the model changes."""
    if not hasattr(model, "peft_config") or not hasattr(model, "base_model"):
        raise ValueError("model must be a PeftModel")
    if len(model.active_adapters) > 1:
        raise ValueError("`initialize_lora_eva_weights` currently only works with a single active adapter")
    if adapter_name not in model.peft_config:
        raise ValueError(f"initialize_lora_eva_weights: no adapter named {adapter_name!r}; adapters: "
                         f"{sorted(model.peft_config)}")
    if model.peft_config[adapter_name].init_lora_weights != "eva":
        raise ValueError("`initialize_lora_eva_weights` can only be used with `init_lora_weights='eva'`")
    if eva_state_dict is None:
        if dataloader is None:
            raise ValueError("dataloader is required if eva_state_dict is not provided")
        eva_state_dict = get_eva_state_dict(model, dataloader, forward_fn=forward_fn,
                                            prepare_model_inputs_fn=prepare_model_inputs_fn,
                                            prepare_layer_inputs_fn=prepare_layer_inputs_fn,
                                            adapter_name=adapter_name,
                                            gather_distributed_inputs=gather_distributed_inputs,
                                            show_progress_bar=show_progress_bar)
    _load_eva_state_dict(model, eva_state_dict, adapter_name)
    return model


__all__ = ["get_eva_state_dict", "initialize_lora_eva_weights"]
