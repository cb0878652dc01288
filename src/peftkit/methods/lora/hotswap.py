"""Hot-swapping: replace a loaded adapter's weights in place with those of another saved adapter.

Hugging Face PEFT's ``peft.utils.hotswap`` API: ``hotswap_adapter(model, path, adapter_name)``,
``hotswap_adapter_from_state_dict``, ``prepare_model_for_compiled_hotswap`` and
``check_hotswap_configs_compatible``. The model keeps its modules, parameters and their storage (no
re-wrapping, so a compiled graph or a CUDA graph that captured the parameters stays valid); the new tensors
are copied into them. ``model`` may be a ``torch.compile`` wrapper of a PeftModel.

Rules:

- Same method (else ``ValueError`` naming both types), DoRA on both or neither, dropout present on both or
  neither (its probability is updated), adapter not merged (unmerge first). The file may not target a
  module the adapter lacks (``HotswapError``, a ``ValueError`` and a ``RuntimeError`` as peft's). Every check
  runs before the first change: on any error the model is unchanged.
- LoRA layers the file does not target are zeroed (they add exactly nothing, as in peft; a DoRA magnitude
  is set to the base weight's norm, so such a layer is the base layer).
- LoRA ranks may differ per layer. A smaller rank fills the leading rows of ``A`` / columns of ``B`` and
  zeroes the rest, which adds exactly zero, so outputs equal a fresh load. A larger rank replaces the
  parameter's data (``torch.utils.swap_tensors``: same Parameter object, new shape; a compiled model then
  recompiles), except after :func:`prepare_model_for_compiled_hotswap`, whose ``target_rank`` is a limit.
- The scaling (``alpha / r``, rsLoRA ``alpha / sqrt(r)``, after ``rank_pattern`` / ``alpha_pattern``) is
  taken from the new config and the file's ranks. peftkit's LoRA kernels take it as a Python float (``addmm``'s
  ``alpha``), which ``torch.compile`` specializes on, so a changed value would recompile. After
  :func:`prepare_model_for_compiled_hotswap` the float therefore stays fixed and a swap folds the ratio
  ``new scaling / prepared scaling`` into ``B``'s values: ``s0 (B s1/s0) A = s1 B A``, equal to a fresh load
  up to one float rounding. Consequences: the layer's ``scaling`` (and peft's ``module.scaling[name]`` view)
  keeps the prepared value, ``lora_B`` (and the state dict) holds the folded values, and a factor set with
  ``set_scale`` is kept. Without preparation ``scaling`` becomes the new value (any ``set_scale`` factor
  is dropped, as peft does).
- ``peft_config[adapter_name]`` becomes the new config. Where live ranks or scalings differ from what it
  says (padding, folding, zeroed layers), its ``rank_pattern`` / ``alpha_pattern`` (and ``target_modules``)
  are rewritten to per-layer entries, so ``save_pretrained`` writes a file that loads back to the same
  outputs.

``check_hotswap_configs_compatible`` is peft's stricter check (LoRA only; ``use_rslora``, ``lora_dropout``,
``alpha_pattern``, ``use_dora`` equal), for callers such as diffusers that run it themselves;
``hotswap_adapter`` does not need it, as the differences it refuses are handled here.
"""

from __future__ import annotations

import copy
import math
import os
import re
import warnings
from typing import Any, Literal

import torch
from torch import nn

from ... import checkpoint as ckpt
from ...config import PeftConfig
from ...functional import tuner_of
from .layer import LoraAdapter
from ...targeting import pattern_value

__all__ = ["HotswapError", "check_hotswap_configs_compatible", "hotswap_adapter",
           "hotswap_adapter_from_state_dict", "prepare_model_for_compiled_hotswap"]

# LoRA file-key suffix -> the axis that holds the rank (Linear, Conv and Embedding alike)
_RANK_AXIS = {"lora_A.weight": 0, "lora_B.weight": 1, "lora_embedding_A": 0, "lora_embedding_B": 1}
# config keys peft's check_hotswap_configs_compatible compares, by PEFT type
CONFIG_KEYS_TO_CHECK = {"LORA": ["use_rslora", "lora_dropout", "alpha_pattern", "use_dora"]}


class HotswapError(ValueError, RuntimeError):
    """The file does not fit the adapter (peft raises RuntimeError here, peftkit's loaders ValueError)."""


def _tuner(model: Any) -> Any:
    return tuner_of(getattr(model, "_orig_mod", model))  # torch.compile's wrapper holds the model


def _type(config: Any) -> str:
    return str(getattr(config.peft_type, "value", config.peft_type))


def _scaling(config: Any, alpha: float, r: int) -> float:
    return alpha / math.sqrt(r) if config.use_rslora else alpha / r


def prepare_model_for_compiled_hotswap(model: nn.Module, *, target_rank: int | None = None,
                                       config: Any = None,
                                       check_compiled: Literal["error", "warn", "ignore"] = "error") -> None:
    """Prepare a model with its first LoRA adapter loaded, before ``torch.compile``, for hot-swaps that
    must not recompile: every LoRA adapter's ranks are zero-padded to ``target_rank`` (the largest rank
    any adapter swapped in later will have; outputs are unchanged) and its scaling is fixed (a later swap
    folds a different scaling into ``B``: see the module docstring). ``config`` (a LoraConfig or a dict of
    them, e.g. ``model.peft_config``): their ``r`` and ``rank_pattern`` values become ``target_rank``, as peft.

    The model's own configs record the padded ranks per layer (``rank_pattern`` / ``alpha_pattern``), so
    ``save_pretrained`` still writes a file that loads back to the same outputs.
    """
    if check_compiled not in ("error", "warn", "ignore"):
        raise ValueError(f"check_compiled should be one of 'error', 'warn', or 'ignore', got {check_compiled!r}")
    if hasattr(model, "_orig_mod") or getattr(model, "_compiled_call_impl", None) is not None:
        if check_compiled == "error":
            raise ValueError("Call prepare_model_for_compiled_hotswap *before* compiling the model")
        if check_compiled == "warn":
            warnings.warn("prepare_model_for_compiled_hotswap was called with a model that is already compiled. "
                          "This will likely result in re-compilation. Call it before compiling the model.",
                          stacklevel=2)
    tuner = _tuner(model)
    found = [(name, path, a) for path, layer in tuner.adapter_layers() for name, a in layer.adapters.items()
             if isinstance(a, LoraAdapter)]
    if not found:
        raise ValueError("No adapter layers found on the model, make sure call `prepare_model_for_compiled_hotswap` "
                         "after loading the first adapter and before loading the second adapter.")
    if target_rank is not None:
        too_large = [(path, a.r) for _, path, a in found if a.r > target_rank]
        if too_large:
            raise ValueError(f"Trying to pad the adapter to the target rank {target_rank}, but {too_large[0][0]} "
                             f"has a larger rank ({too_large[0][1]}). This is not possible.")
    with torch.no_grad():
        for _, _, a in found:
            a.hotswap_prepared = True  # read by hotswap only, never in forward (no compile guard)
            if target_rank is not None and a.r < target_rank:
                for param, axis in (("lora_A", 0), ("lora_B", 1)):
                    old = getattr(a, param)
                    shape = list(old.shape)
                    shape[axis] = target_rank
                    new = old.new_zeros(shape)
                    new.narrow(axis, 0, a.r).copy_(old)
                    setattr(a, param, nn.Parameter(new, requires_grad=old.requires_grad))
                a.r = target_rank
    for name in dict.fromkeys(n for n, _, _ in found):
        _record_live(tuner, name, tuner.peft_config[name])
    if not config or target_rank is None:
        return
    for lora_config in (config.values() if isinstance(config, dict) else [config]):
        lora_config.r = target_rank
        for key in lora_config.rank_pattern or {}:
            lora_config.rank_pattern[key] = target_rank


def _record_live(tuner: Any, adapter_name: str, config: Any) -> None:
    """Rewrite ``config``'s rank / alpha patterns to per-layer entries when it does not give every LoRA layer
    of ``adapter_name`` its live rank and scaling (``unit_scaling``, before any ``set_scale`` factor)."""
    layers = [(p, a) for p, a in tuner.adapters(adapter_name) if isinstance(a, LoraAdapter)]

    def alpha_for(a: LoraAdapter) -> float:  # the alpha that gives the live scaling at the live rank
        return a.unit_scaling * (math.sqrt(a.r) if config.use_rslora else a.r)

    def fits(path: str, a: LoraAdapter) -> bool:
        r = pattern_value(config.rank_pattern, path, config.r)
        alpha = pattern_value(config.alpha_pattern, path, config.lora_alpha)
        return r == a.r and math.isclose(_scaling(config, alpha, r), a.unit_scaling, rel_tol=1e-12)

    for _, a in layers:
        a.lora_alpha = alpha_for(a)
    if all(fits(p, a) for p, a in layers):
        return
    # exact per-layer keys only (a user pattern listed first would win over an appended one)
    config.rank_pattern = {re.escape(p): a.r for p, a in layers if a.r != config.r}
    config.alpha_pattern = {re.escape(p): alpha_for(a) for p, a in layers
                            if not math.isclose(alpha_for(a), config.lora_alpha, rel_tol=1e-12)}


def _file_keys(state_dict: dict[str, torch.Tensor], adapter_name: str, prefix: str) -> dict[str, torch.Tensor]:
    """File layout (``base_model.model.<path>.lora_A.weight``) from a file's keys, keys without the
    ``base_model.model.`` prefix, or peft's model layout (``...lora_A.<adapter>.weight``, ``_orig_mod.``)."""
    named = re.compile(rf"\.({re.escape(prefix)}[^.]*)\.{re.escape(adapter_name)}(?=\.|$)")
    out = {}
    for key, value in state_dict.items():
        key = named.sub(r".\1", key.removeprefix("_orig_mod."), count=1)
        if key.endswith("lora_magnitude_vector.weight"):  # peft's DoRA module parameter -> its file key
            key = key[: -len(".weight")]
        out[key if key.startswith(ckpt.SHARED_PREFIX) else ckpt.PREFIX + key] = value
    return out


def _rank_suffix(key: str) -> str | None:
    return next((s for s in _RANK_AXIS if key.endswith("." + s)), None)


def hotswap_adapter(model: nn.Module, model_name_or_path: str, adapter_name: str = "default",
                    torch_device: str | None = None, **kwargs: Any) -> None:
    """Replace the weights of ``adapter_name`` with the adapter saved in ``model_name_or_path`` (a local
    folder; ``subfolder=`` as peft), in place. The name stays; ``peft_config[adapter_name]`` becomes the new
    config. Tensors are copied onto each live parameter's device (``torch_device`` is accepted for peft's
    signature)."""
    tuner = _tuner(model)
    if adapter_name not in tuner.peft_config:
        raise ValueError(f"hotswap_adapter: no adapter named {adapter_name!r}; adapters: {sorted(tuner.peft_config)}")
    folder = str(model_name_or_path)
    if kwargs.get("subfolder"):
        folder = os.path.join(folder, kwargs["subfolder"])
    config = PeftConfig.from_pretrained(folder)
    state, source = ckpt.read_weights(folder)
    hotswap_adapter_from_state_dict(model, state, adapter_name, config, source=source)


@torch.no_grad()
def hotswap_adapter_from_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], adapter_name: str,
                                    config: PeftConfig, parameter_prefix: str = "lora_", *,
                                    source: str = "state dict") -> None:
    """As :func:`hotswap_adapter`, from the new adapter's tensors and config. Keys in the file layout, without
    its ``base_model.model.`` prefix, or in peft's model layout with the adapter name
    (``...q_proj.lora_A.default.weight``; ``parameter_prefix`` finds the name's position, as peft)."""
    tuner = _tuner(model)
    if adapter_name not in tuner.peft_config:
        raise ValueError(f"hotswap_adapter: no adapter named {adapter_name!r}; adapters: {sorted(tuner.peft_config)}")
    old = tuner.peft_config[adapter_name]
    merged = [p for p, layer in tuner.adapter_layers() if adapter_name in layer.merged_adapters]
    if merged:
        raise ValueError(f"hotswap_adapter: cannot hot-swap adapter {adapter_name!r} because it is merged into the "
                         f"base weights ({merged[0]} and {len(merged) - 1} more layers); unmerge it first "
                         "(model.unmerge_adapter())")
    if _type(old) != _type(config) or type(old) is not type(config):
        raise ValueError(f"hotswap_adapter: incompatible PEFT types: {source} holds a {_type(config)} adapter but "
                         f"{adapter_name!r} is {_type(old)}; hot-swapping keeps the method")
    if getattr(old, "use_dora", False) != getattr(config, "use_dora", False):
        raise ValueError(f"hotswap_adapter: use_dora differs between {adapter_name!r} and {source}")
    layers = dict(tuner.adapters(adapter_name))
    lora = [(p, a) for p, a in layers.items() if isinstance(a, LoraAdapter)]
    p_new = getattr(config, "lora_dropout", 0.0)
    if any((a.dropout is None) != (p_new == 0) for _, a in lora):
        raise ValueError(f"hotswap_adapter: lora_dropout {getattr(old, 'lora_dropout', 0.0)} of {adapter_name!r} "
                         f"and {p_new} of {source}: dropout cannot be added or removed in place")

    live = ckpt.adapter_tensors(tuner, adapter_name)
    state = _file_keys(state_dict, adapter_name, parameter_prefix)
    extra = sorted(set(state) - set(live))
    if extra:
        raise HotswapError(f"hotswap_adapter: {source} does not target the same modules as {adapter_name!r}: keys "
                           f"only in the file {extra[:3]} ({len(extra)} in all); hot-swapping cannot add layers")
    # LoRA layers the file does not target are zeroed (as peft); anything else must be complete
    missing, zeroed = set(live) - set(state), []
    for path, a in lora:
        keys = {f"{ckpt.PREFIX}{path}.{suffix}" for suffix in a.checkpoint_keys.values()}
        if keys <= missing:
            zeroed.append((path, a))
            missing -= keys
    if missing:
        raise HotswapError(f"hotswap_adapter: {source} lacks {sorted(missing)[:3]} ({len(missing)} missing in all)")
    ranks: dict[str, int] = {}  # LoRA layer path -> the file's rank
    for key, value in state.items():
        target, suffix = live[key], _rank_suffix(key)
        axis = _RANK_AXIS.get(suffix)
        if suffix is None or value.dim() != target.dim() or any(
                a != b for i, (a, b) in enumerate(zip(value.shape, target.shape)) if i != axis):
            if tuple(value.shape) == tuple(target.shape):
                continue
            raise HotswapError(f"hotswap_adapter: shape mismatch for {key!r}: file {tuple(value.shape)}, "
                               f"model {tuple(target.shape)}")
        path = key[len(ckpt.PREFIX):-len(suffix) - 1]
        r_new = value.shape[axis]
        if ranks.setdefault(path, r_new) != r_new:
            raise HotswapError(f"hotswap_adapter: {source}: lora_A and lora_B of {path} have different ranks")
        if r_new > target.shape[axis] and getattr(layers[path], "hotswap_prepared", False):
            raise HotswapError(f"hotswap_adapter: {key!r} has rank {r_new} > the prepared rank {target.shape[axis]}; "
                               f"prepare_model_for_compiled_hotswap(model, target_rank=...) with at least {r_new}")

    # every check passed: change the model
    bases = dict(tuner.adapter_layers())
    for path, a in zeroed:
        a.lora_A.zero_()
        a.lora_B.zero_()
        if a.magnitude is not None:  # DoRA with B = 0: m = ||W0|| makes the layer the base layer
            a.magnitude.copy_(a._full_norm(bases[path].base_layer).reshape(a.magnitude.shape))
    for key, value in state.items():
        target, suffix = live[key], _rank_suffix(key)
        value = value.to(device=target.device, dtype=target.dtype)
        if suffix is None or value.shape == target.shape:
            target.copy_(value)
        elif value.shape[_RANK_AXIS[suffix]] < target.shape[_RANK_AXIS[suffix]]:
            target.zero_()
            target.narrow(_RANK_AXIS[suffix], 0, value.shape[_RANK_AXIS[suffix]]).copy_(value)
        else:  # a larger rank: the same Parameter object takes the new shape
            new = nn.Parameter(value.clone(), requires_grad=target.requires_grad)
            try:
                torch.utils.swap_tensors(target, new)
            except RuntimeError:  # e.g. weak references to the parameter
                target.data = new.data
    new_config = copy.deepcopy(config)
    new_config.inference_mode = old.inference_mode
    if zeroed:  # the zeroed layers stay in the model, so in the config that saves them
        new_config.target_modules = set(layers)
        for field in ("exclude_modules", "layers_to_transform", "layers_pattern"):
            if hasattr(new_config, field):
                setattr(new_config, field, None)
    if lora:
        _swap_scalings(lora, ranks, new_config)
        _record_live(tuner, adapter_name, new_config)
    tuner.peft_config[adapter_name] = new_config


def _swap_scalings(lora: list[tuple[str, LoraAdapter]], ranks: dict[str, int], config: Any) -> None:
    """Each swapped LoRA layer gets the new config's rank and scaling (folded into B once prepared)."""
    for path, a in lora:
        if a.dropout is not None:
            a.dropout.p = config.lora_dropout
        if path not in ranks:  # zeroed: adds nothing whatever its scaling
            continue
        r_new = ranks[path]
        a.r = max(a.r, r_new)  # grown layers take the file's rank; padded ones keep the live one
        s_new = _scaling(config, pattern_value(config.alpha_pattern, path, config.lora_alpha), r_new)
        if getattr(a, "hotswap_prepared", False) and a.unit_scaling != 0:
            if s_new != a.unit_scaling:  # the float a compiled graph specialized on stays; B carries the ratio
                a.lora_B.mul_(s_new / a.unit_scaling)
        else:  # a zero prepared scaling cannot carry a ratio: the float changes (a compiled model recompiles)
            a.unit_scaling = a.scaling = s_new


def check_hotswap_configs_compatible(config0: PeftConfig, config1: PeftConfig) -> None:
    """peft's check that two configs can be hot-swapped: same PEFT type, LoRA only, and equal ``use_rslora``,
    ``lora_dropout``, ``alpha_pattern`` and ``use_dora``; raises ``ValueError`` otherwise."""
    type0, type1 = _type(config0), _type(config1)
    if type0 != type1:
        raise ValueError(f"Incompatible PEFT types found: {type0} and {type1}")
    if type0 not in CONFIG_KEYS_TO_CHECK:
        raise ValueError(f"Hotswapping only supports {', '.join(CONFIG_KEYS_TO_CHECK)} but {type0} was passed.")
    dict0, dict1 = config0.to_dict(), config1.to_dict()
    sentinel = object()
    for key in CONFIG_KEYS_TO_CHECK[type0]:
        val0, val1 = dict0.get(key, sentinel), dict1.get(key, sentinel)
        if val0 != val1:
            raise ValueError(f"Configs are incompatible: for {key}, {val0} != {val1}")
