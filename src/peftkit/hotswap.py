"""Hot-swapping: replace a loaded adapter's weights in place with those of another saved adapter.

``hotswap_adapter(model, path, adapter_name)`` (Hugging Face PEFT's ``peft.utils.hotswap`` name) keeps the
model's modules, parameters and their storage (no re-wrapping, so a compiled graph or a CUDA graph that
captured the parameters stays valid) and copies the new tensors into them.

Rules:

- Same method, same targeted modules (the file's keys must be exactly the adapter's, else an error names
  the keys that differ); DoRA on both or neither. Every check runs before the first copy: on any error the
  model is unchanged.
- LoRA ranks may differ per layer as long as the new rank is not larger than the loaded one: the new
  factors fill the leading rows of ``A`` / columns of ``B`` and the rest is zeroed, which adds exactly
  zero (so outputs equal a fresh load). A larger rank raises: load the first adapter with a rank at least
  as large as any you will swap in (e.g. save it with a larger ``r``). The scaling (``alpha / r`` or rsLoRA
  ``alpha / sqrt(r)``, after ``rank_pattern`` / ``alpha_pattern``) is recomputed from the new config and the
  new ranks. It is a Python float: under ``torch.compile`` a changed value recompiles.
- ``peft_config[adapter_name]`` becomes the new config; where ranks were padded, its ``rank_pattern`` /
  ``alpha_pattern`` record the live (padded) rank and the alpha that keeps the new scaling, so
  ``save_pretrained`` writes a file that loads back to the same outputs.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from . import checkpoint as ckpt
from .config import PeftConfig
from .targeting import pattern_value

# LoRA file-key suffix -> the axis that holds the rank
_RANK_AXIS = {"lora_A.weight": 0, "lora_B.weight": 1, "lora_embedding_A": 0, "lora_embedding_B": 1}


def hotswap_adapter(model: Any, model_name_or_path: str, adapter_name: str = "default",
                    torch_device: str | None = None, **kwargs: Any) -> None:
    """Replace the weights of ``adapter_name`` with the adapter saved in ``model_name_or_path``, in place."""
    tuner = getattr(model, "base_model", model)
    if adapter_name not in tuner.peft_config:
        raise ValueError(f"hotswap_adapter: no adapter named {adapter_name!r}; adapters: {sorted(tuner.peft_config)}")
    folder = str(model_name_or_path)
    config = PeftConfig.from_pretrained(folder)
    state, source = ckpt.read_weights(folder)
    hotswap_adapter_from_state_dict(model, state, adapter_name, config, source=source)


@torch.no_grad()
def hotswap_adapter_from_state_dict(model: Any, state_dict: dict[str, torch.Tensor], adapter_name: str,
                                    config: PeftConfig, source: str = "state dict") -> None:
    """As :func:`hotswap_adapter`, from PEFT-layout tensors and their config."""
    tuner = getattr(model, "base_model", model)
    old = tuner.peft_config[adapter_name]
    if type(old) is not type(config):
        raise ValueError(f"hotswap_adapter: {source} holds a {config.peft_type} adapter but {adapter_name!r} is "
                         f"{old.peft_type}; hot-swapping keeps the method")
    if getattr(old, "use_dora", False) != getattr(config, "use_dora", False):
        raise ValueError(f"hotswap_adapter: use_dora differs between {adapter_name!r} and {source}")
    live = ckpt.adapter_tensors(tuner, adapter_name)
    # file keys ("base_model.model.<path>...", as read from disk) or keys without that prefix
    state = {k if k.startswith(ckpt.SHARED_PREFIX) else ckpt.PREFIX + k: v for k, v in state_dict.items()}
    extra, missing = sorted(set(state) - set(live)), sorted(set(live) - set(state))
    if extra or missing:
        raise ValueError(f"hotswap_adapter: {source} does not target the same modules as {adapter_name!r}: "
                         f"keys only in the file {extra[:3]}, only in the model {missing[:3]}")
    ranks: dict[str, int] = {}  # layer path -> new rank (LoRA)
    for key, value in state.items():
        target = live[key]
        suffix = next((s for s in _RANK_AXIS if key.endswith("." + s)), None)
        if tuple(value.shape) == tuple(target.shape) and suffix is None:
            continue
        if suffix is None or value.dim() != target.dim() or any(
                a != b for i, (a, b) in enumerate(zip(value.shape, target.shape)) if i != _RANK_AXIS[suffix]):
            raise ValueError(f"hotswap_adapter: shape mismatch for {key!r}: file {tuple(value.shape)}, "
                             f"model {tuple(target.shape)}")
        r_new, r_live = value.shape[_RANK_AXIS[suffix]], target.shape[_RANK_AXIS[suffix]]
        if r_new > r_live:
            raise ValueError(f"hotswap_adapter: {key!r} has rank {r_new} > the loaded rank {r_live}; load the "
                             "first adapter with a rank at least as large (ranks can only be padded)")
        path = key[len(ckpt.PREFIX):-len(suffix) - 1]
        ranks[path] = r_new
    # every check passed: copy
    for key, value in state.items():
        target = live[key]
        suffix = next((s for s in _RANK_AXIS if key.endswith("." + s)), None)
        if suffix is not None and value.shape != target.shape:
            target.zero_()
            target.narrow(_RANK_AXIS[suffix], 0, value.shape[_RANK_AXIS[suffix]]).copy_(value)
        else:
            target.copy_(value)
    if ranks:
        config = _lora_scalings(tuner, adapter_name, config, ranks)
    config.inference_mode = old.inference_mode
    tuner.peft_config[adapter_name] = config


def _lora_scalings(tuner: Any, adapter_name: str, config: Any, ranks: dict[str, int]) -> Any:
    """Set each LoRA layer's scaling from the new config; record padded ranks in the config's patterns."""
    rank_pattern, alpha_pattern = dict(config.rank_pattern), dict(config.alpha_pattern)
    for path, adapter in tuner.adapters(adapter_name):
        r = ranks.get(path, pattern_value(config.rank_pattern, path, config.r))
        alpha = pattern_value(config.alpha_pattern, path, config.lora_alpha)
        adapter.scaling = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        r_live = adapter.lora_A.shape[0]
        if r_live != r:
            rank_pattern[re.escape(path)] = r_live
            root = math.sqrt(r_live) if config.use_rslora else r_live
            alpha_pattern[re.escape(path)] = adapter.scaling * root
    config.rank_pattern, config.alpha_pattern = rank_pattern, alpha_pattern
    return config
