"""Adapter files in the Hugging Face PEFT layout, read and written safely.

A folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` whose keys look like
``base_model.model.<module path>.lora_A.weight`` (adapter name removed). Writes are atomic; reads never
unpickle (safetensors, or a legacy ``adapter_model.bin`` through ``torch.load(weights_only=True)``), and a
state dict is fully validated against the model before a single tensor is copied.

Tensors an adapter's layers share (``Adapter.uses_shared_state``, e.g. VeRA's projections) sit at the model
level, ``base_model.<name>`` (as in PEFT: ``base_model.vera_A``). They are written when the method says so
(``saves_shared``) and optional on load: present, they replace the ones rebuilt at injection (same shape
required); absent, the rebuilt ones stay.
"""

from __future__ import annotations

import os
import warnings
from collections import namedtuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .io import atomic_write
from .registry import get_method
from .tuner import TunerModel

PREFIX = "base_model.model."
SHARED_PREFIX = "base_model."  # adapter-level shared tensors
SAFETENSORS_NAME = "adapter_model.safetensors"
LEGACY_NAME = "adapter_model.bin"

LoadResult = namedtuple("LoadResult", ["missing_keys", "unexpected_keys"])


class CheckpointError(ValueError):
    """An adapter file is unreadable or does not fit the model."""


def adapter_tensors(tuner: TunerModel, adapter_name: str, for_save: bool = False) -> dict[str, Tensor]:
    """Checkpoint key -> live tensor for one adapter (its weights, saved modules and trained biases).

    An adapter with ``file_tensors(for_save)`` names its own keys, whole (model-level prompt adapters: PEFT's
    ``prompt_embeddings``); what it saves may be computed (P-tuning saves its encoder's output) and differ
    from where a load copies to (``for_save=False``)."""
    if adapter_name not in tuner.peft_config:
        raise KeyError(f"no adapter named {adapter_name!r}; adapters: {sorted(tuner.peft_config)}")
    out: dict[str, Tensor] = {}
    for path, adapter in tuner.adapters(adapter_name):
        if hasattr(adapter, "file_tensors"):
            out.update(adapter.file_tensors(for_save))
            continue
        for param, suffix in adapter.checkpoint_keys.items():
            out[f"{PREFIX}{path}.{suffix}"] = getattr(adapter, param)
    # PEFT's prompt-learning models have no tuner between the PeftModel and the user's model: "base_model.<path>"
    prefix = SHARED_PREFIX if tuner.peft_config[adapter_name].is_prompt_learning else PREFIX
    for path, wrapper in tuner.saved_modules():
        if adapter_name in wrapper.modules_to_save:
            for key, value in wrapper.modules_to_save[adapter_name].state_dict(keep_vars=True).items():
                out[f"{prefix}{path}.{key}"] = value
    for key, param in tuner.bias_parameters(adapter_name).items():
        out[prefix + key] = param
    if get_method(tuner.peft_config[adapter_name]).adapter_cls.saves_shared(tuner.peft_config[adapter_name]):
        out.update(shared_tensors(tuner, adapter_name))
    return out


def shared_tensors(tuner: TunerModel, adapter_name: str) -> dict[str, Tensor]:
    """Checkpoint key -> live buffer of the adapter's shared tensors (empty for most methods)."""
    if adapter_name not in tuner.shared_state:
        return {}
    keys = get_method(tuner.peft_config[adapter_name]).adapter_cls.shared_checkpoint_keys
    buffers = tuner.shared_state[adapter_name].tensors()
    return {SHARED_PREFIX + keys[name]: buf for name, buf in buffers.items() if name in keys}


def state_dict_for_save(tuner: TunerModel, adapter_name: str) -> dict[str, Tensor]:
    """Detached tensors by file key. Sharded (FSDP ``DTensor``) ones are gathered whole: a collective, so under
    FSDP every rank calls this, in the same order (rank 0 writes the file)."""
    return {k: _whole(v.detach()) for k, v in adapter_tensors(tuner, adapter_name, for_save=True).items()}


def _whole(t: Tensor) -> Tensor:
    full = getattr(t, "full_tensor", None)
    return full() if full is not None else t


def validate(tuner: TunerModel, adapter_name: str, state: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """Check every key and shape; return checkpoint key -> destination tensor. Raises before any copy."""
    optional = shared_tensors(tuner, adapter_name)  # loaded when present, rebuilt at injection otherwise
    targets = {**adapter_tensors(tuner, adapter_name), **optional}
    base = None
    for key in sorted(state):
        if key not in targets:
            # a full base tensor saved next to the adapter (e.g. a resized embedding) loads into the base
            base = base or dict(tuner.model.named_parameters())
            if key.startswith(PREFIX) and key[len(PREFIX):] in base:
                targets[key] = base[key[len(PREFIX):]]
            else:
                raise CheckpointError(f"{source}: key {key!r} matches no parameter of adapter {adapter_name!r}")
        if tuple(state[key].shape) != tuple(targets[key].shape):
            raise CheckpointError(
                f"{source}: shape mismatch for {key!r}: checkpoint {tuple(state[key].shape)}, "
                f"model {tuple(targets[key].shape)}"
            )
    absent = sorted(set(optional) - set(state))
    config = tuner.peft_config[adapter_name]
    if absent and get_method(config).adapter_cls.saves_shared(config):
        warnings.warn(f"{source}: {absent} not in the file; using the ones rebuilt from the config", stacklevel=3)
    missing = sorted(set(targets) - set(state) - set(optional))
    if missing:
        raise CheckpointError(f"{source}: missing key {missing[0]!r} ({len(missing)} missing in all)")
    return targets


@torch.no_grad()
def load_state(tuner: TunerModel, adapter_name: str, state: dict[str, Tensor], source: str = "state dict") -> None:
    """Copy a PEFT-layout state dict into an existing adapter, all or nothing."""
    for _, adapter in tuner.adapters(adapter_name):
        adapter.before_load()  # a no-op but for layouts that differ from the live one (AdaLoRA's pruned ranks)
    targets = validate(tuner, adapter_name, state, source)
    owners = _meta_owners(tuner, adapter_name)
    for key, value in state.items():
        target = targets[key]
        if target.is_meta:  # built on meta for this load: materialized once, from the file's tensor. A copy:
            # safetensors' tensors are views of one buffer, not 64-byte aligned, and SIMD kernels round
            # differently on unaligned data. Swapped in place, so every reference to the parameter sees it.
            value = value.to(device=owners[id(target)], dtype=target.dtype, memory_format=torch.contiguous_format,
                             copy=True)
            torch.utils.swap_tensors(target, nn.Parameter(value, requires_grad=target.requires_grad))
        else:
            target.copy_(value)


def _meta_owners(tuner: TunerModel, adapter_name: str) -> dict[int, torch.device]:
    """id of each meta parameter of the adapter -> the device it loads to (its base layer's)."""
    out = {}
    for _, adapter in tuner.adapters(adapter_name):
        for name in adapter.checkpoint_keys:
            t = getattr(adapter, name, None)
            if isinstance(t, Tensor) and t.is_meta:
                out[id(t)] = adapter.load_device
    return out


def save_adapter(tuner: TunerModel, adapter_name: str, folder: str, safe_serialization: bool = True) -> None:
    """Write one adapter's config and weights into ``folder``, each file atomically."""
    os.makedirs(folder, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in state_dict_for_save(tuner, adapter_name).items()}
    config = tuner.peft_config[adapter_name]
    base_name = getattr(getattr(tuner.model, "config", None), "_name_or_path", None)
    if config.base_model_name_or_path is None and base_name:
        config.base_model_name_or_path = base_name
    if safe_serialization:
        atomic_write(os.path.join(folder, SAFETENSORS_NAME), lambda tmp: save_file(tensors, tmp, {"format": "pt"}))
    else:
        atomic_write(os.path.join(folder, LEGACY_NAME), lambda tmp: torch.save(tensors, tmp))
    inference_mode = config.inference_mode
    config.inference_mode = True  # saved adapters load for inference unless asked otherwise
    try:
        config.save_pretrained(folder)
    finally:
        config.inference_mode = inference_mode


def read_weights(folder: str) -> tuple[dict[str, Tensor], str]:
    """The tensors in ``folder``'s adapter file, and the file's path. Never unpickles arbitrary objects."""
    path = os.path.join(folder, SAFETENSORS_NAME)
    if os.path.isfile(path):
        try:
            return load_file(path), path
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    legacy = os.path.join(folder, LEGACY_NAME)
    if os.path.isfile(legacy):
        try:
            state = torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for corrupt or unsafe pickles
            raise CheckpointError(f"{legacy}: not a readable tensor file ({err})") from None
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise CheckpointError(f"{legacy}: expected a dict of tensors")
        return state, legacy
    raise FileNotFoundError(f"{folder}: no adapter weights ({SAFETENSORS_NAME} or {LEGACY_NAME})")
