"""Adapter files in the Hugging Face PEFT layout, read and written safely.

A folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` whose keys look like
``base_model.model.<module path>.lora_A.weight`` (adapter name removed). The two files are replaced together
(``io.commit_files``): a save killed at any point leaves the old adapter or the new one, as ``read_adapter``
sees it, never new weights next to the old config. Reads never unpickle (safetensors, or a legacy
``adapter_model.bin`` through ``torch.load(weights_only=True)``), and a state dict is fully validated against
the model before a single tensor is copied; a failed load is undone (``Undo``).

Besides the adapter's own tensors, a file may carry only the base model's input embedding and output layer
(PEFT's ``save_embedding_layers``, for a resized or trained vocabulary); any other base key is refused.

Tensors an adapter's layers share (``Adapter.uses_shared_state``, e.g. VeRA's projections) sit at the model
level, ``base_model.<name>`` (as in PEFT: ``base_model.vera_A``). They are written when the method says so
(``saves_shared``) and optional on load: present, they replace the ones rebuilt at injection (same shape
required); absent, the rebuilt ones stay.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections import namedtuple
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .config import CONFIG_NAME, PeftConfig
from .file_options import (  # noqa: F401  (apply_load_options, PREFIX, SHARED_PREFIX: re-exported)
    PREFIX, SHARED_PREFIX, apply_load_options, embedding_tensors, saved_embeddings, unwrapped_keys, whole)
from .io import TMP_PREFIX, commit_files, resolve_files
from .registry import get_method
from .tuner import TunerModel

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
        own = adapter.file_tensors(for_save)
        if own is not None:
            out.update(own)
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
    return unwrapped_keys(out)


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
    return {k: whole(v.detach()) for k, v in adapter_tensors(tuner, adapter_name, for_save=True).items()}


def validate(tuner: TunerModel, adapter_name: str, state: dict[str, Tensor], source: str,
             ignore_mismatched_sizes: bool = False) -> dict[str, Tensor]:
    """Check every key and shape; return checkpoint key -> destination tensor. Raises before any copy.

    ``ignore_mismatched_sizes`` (peft's): a tensor whose shape differs from the model's is left out of the
    result (its destination keeps its value) and named in a warning, instead of raising."""
    optional = shared_tensors(tuner, adapter_name)  # loaded when present, rebuilt at injection otherwise
    targets = {**adapter_tensors(tuner, adapter_name), **optional}
    embeddings = None
    mismatched = []
    for key in sorted(state):
        if key not in targets:
            # the base's input embedding / output layer saved next to the adapter (a resized vocabulary)
            embeddings = embedding_tensors(tuner, adapter_name) if embeddings is None else embeddings
            if key not in embeddings:
                raise CheckpointError(_unexpected(tuner, adapter_name, key, source))
            targets[key] = embeddings[key]
        if tuple(state[key].shape) != tuple(targets[key].shape):
            if ignore_mismatched_sizes:
                mismatched.append((key, state[key].shape, targets[key].shape))
                continue
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
    if mismatched:  # peft's message (transformers' wording)
        listed = "\n".join(f"- {k}: found shape {a} in the checkpoint and {b} in the model instantiated"
                           for k, a, b in mismatched)
        warnings.warn(f"Some weights of {type(tuner.model).__name__} were not initialized from the model checkpoint "
                      f"and are being ignored because you passed `ignore_mismatched_sizes=True`: {listed}.",
                      stacklevel=3)
        for key, _, _ in mismatched:
            del targets[key]
    return targets


def _unexpected(tuner: TunerModel, adapter_name: str, key: str, source: str) -> str:
    base = dict(tuner.model.named_parameters())
    for prefix in (PREFIX, SHARED_PREFIX):
        if key.startswith(prefix) and key[len(prefix):] in base:
            return (f"{source}: key {key!r} names a parameter of the base model; an adapter file may overwrite "
                    f"only the input embedding and output layer (PEFT's save_embedding_layers), nothing else")
    return f"{source}: key {key!r} matches no parameter of adapter {adapter_name!r}"


@torch.no_grad()
def load_state(tuner: TunerModel, adapter_name: str, state: dict[str, Tensor], source: str = "state dict",
               ignore_mismatched_sizes: bool = False) -> None:
    """Copy a PEFT-layout state dict into an existing adapter, all or nothing (``ignore_mismatched_sizes``:
    tensors of another shape than the model's are skipped with a warning, see ``validate``)."""
    for _, adapter in tuner.adapters(adapter_name):
        adapter.before_load()  # a no-op but for layouts that differ from the live one (AdaLoRA's pruned ranks)
    targets = validate(tuner, adapter_name, state, source, ignore_mismatched_sizes)
    owners = _meta_owners(tuner, adapter_name)
    for key, value in state.items():
        if key not in targets:  # a mismatched size, ignored
            continue
        target = targets[key]
        if target.is_meta:  # built on meta for this load: materialized once, from the file's tensor. A copy:
            # safetensors' tensors are views of one buffer, not 64-byte aligned, and SIMD kernels round
            # differently on unaligned data. Swapped in place, so every reference to the parameter sees it.
            value = value.to(device=owners[id(target)], dtype=target.dtype, memory_format=torch.contiguous_format,
                             copy=True)
            torch.utils.swap_tensors(target, nn.Parameter(value, requires_grad=target.requires_grad))
        elif hasattr(target, "device_mesh"):  # a sharded parameter (FSDP2's DTensor): this rank's part of it
            from torch.distributed.tensor import distribute_tensor

            target.copy_(distribute_tensor(value.to(device=target.device, dtype=target.dtype), target.device_mesh,
                                           target.placements))
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


def save_plan(tuner: TunerModel, adapter_name: str, safe_serialization: bool = True,
              save_embedding_layers: bool | str = False) -> dict[str, Any]:
    """What ``commit_save`` writes for one adapter: its tensors and its config's text (computed, not written).
    ``save_embedding_layers``: see ``saved_embeddings``."""
    state = {**state_dict_for_save(tuner, adapter_name), **saved_embeddings(tuner, adapter_name, save_embedding_layers)}
    tensors, storages = {}, set()
    for k, v in state.items():  # safetensors refuses tensors sharing memory (tied embeddings): copies, as peft
        ptr = v.untyped_storage().data_ptr()
        tensors[k] = v.clone(memory_format=torch.contiguous_format) if ptr in storages else v.contiguous()
        storages.add(ptr)
    config = tuner.peft_config[adapter_name]
    base_name = getattr(getattr(tuner.model, "config", None), "_name_or_path", None)
    if config.base_model_name_or_path is None and base_name:
        config.base_model_name_or_path = base_name
    data = config.to_dict()
    data["inference_mode"] = True  # saved adapters load for inference unless asked otherwise
    # the layout of PeftConfig.save_pretrained
    return {"tensors": tensors, "config": json.dumps(data, indent=2, sort_keys=True), "safe": safe_serialization}


def commit_save(plan: dict[str, Any], folder: str) -> None:
    """Write a ``save_plan`` into ``folder``: weights and config replaced together, the other weights format
    (a stale ``adapter_model.bin`` next to new safetensors, or the reverse) deleted in the same commit."""
    tensors = plan["tensors"]

    def config(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(plan["config"])

    if plan["safe"]:
        weights, other = SAFETENSORS_NAME, LEGACY_NAME
        write = lambda tmp: save_file(tensors, tmp, {"format": "pt"})  # noqa: E731
    else:
        weights, other = LEGACY_NAME, SAFETENSORS_NAME
        write = lambda tmp: torch.save(tensors, tmp)  # noqa: E731
    commit_files(folder, {weights: write, CONFIG_NAME: config}, remove=[other])


def save_adapter(tuner: TunerModel, adapter_name: str, folder: str, safe_serialization: bool = True) -> None:
    """Write one adapter's config and weights into ``folder``, together."""
    commit_save(save_plan(tuner, adapter_name, safe_serialization), folder)


def read_adapter(folder: str, config: PeftConfig | None = None) -> tuple[PeftConfig, dict[str, Tensor], str]:
    """The config (``config`` when given) and tensors of the adapter saved in ``folder``, and the weights
    file's path: a consistent pair, also in a folder whose last save was killed (the old adapter, or the new
    one when that save got past its commit point). Never writes."""
    names = [CONFIG_NAME, SAFETENSORS_NAME, LEGACY_NAME]
    for attempt in range(3):
        paths = resolve_files(folder, names)
        as_named = {n: os.path.join(folder, n) if os.path.exists(os.path.join(folder, n)) else None for n in names}
        try:
            if config is None:
                read = PeftConfig.from_pretrained(paths[CONFIG_NAME] or folder)  # absent: raises, naming the file
            if paths == as_named:  # the usual case: no interrupted save
                state, source = read_weights(folder)
            else:
                state, source = _read_weights(folder, paths[SAFETENSORS_NAME], paths[LEGACY_NAME])
        except FileNotFoundError:  # a save in progress renamed a temporary away: read the folder again
            if attempt == 2 or not any(p and os.path.basename(p).startswith(TMP_PREFIX) for p in paths.values()):
                raise
            continue
        return (config if config is not None else read), state, source
    raise AssertionError("unreachable")


def read_weights(folder: str) -> tuple[dict[str, Tensor], str]:
    """The tensors in ``folder``'s adapter file (as it is under its name), and the file's path. Never unpickles
    arbitrary objects. ``read_adapter`` reads config and weights together."""
    safetensors, legacy = (os.path.join(folder, n) for n in (SAFETENSORS_NAME, LEGACY_NAME))
    return _read_weights(folder, safetensors if os.path.isfile(safetensors) else None,
                         legacy if os.path.isfile(legacy) else None)


def _read_weights(folder: str, path: str | None, legacy: str | None) -> tuple[dict[str, Tensor], str]:
    if path is not None:
        try:
            return load_file(path), path
        except FileNotFoundError:
            raise
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    if legacy is not None:
        try:
            state = torch.load(legacy, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as err:  # torch raises several types for corrupt or unsafe pickles
            raise CheckpointError(f"{legacy}: not a readable tensor file ({err})") from None
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise CheckpointError(f"{legacy}: expected a dict of tensors")
        return state, legacy
    raise FileNotFoundError(f"{folder}: no adapter weights ({SAFETENSORS_NAME} or {LEGACY_NAME})")


# -- undoing a failed load ---------------------------------------------------------------------------------
_NONE = object()


class Undo:
    """What a load may change, recorded before it and put back by ``restore()``: every module's attributes
    (children, parameters, buffers, hooks, training flag, plain attributes; dicts, lists and sets one level
    deep, in place, so their identity stays), every parameter's ``requires_grad``, and the attributes of the
    given configs and of the configs nested in them. Tensor values are not recorded: loads validate before
    copying any."""

    def __init__(self, model: nn.Module, *configs: Any) -> None:
        objects: dict[int, Any] = {}
        for module in model.modules():
            objects[id(module)] = module
        for config in configs:
            _collect_configs(config, objects)
        self._objects = [(obj, _attrs(obj)) for obj in objects.values()]
        self._flags = [(p, p.requires_grad) for p in model.parameters()]

    def restore(self) -> None:
        for obj, attrs in self._objects:
            state = vars(obj)
            for key in [k for k in state if k not in attrs]:
                del state[key]
            for key, (value, contents) in attrs.items():
                if contents is not _NONE and not _unchanged(value, contents):
                    if isinstance(value, list):
                        value[:] = contents
                    else:
                        value.clear()
                        value.update(contents)
                state[key] = value
        for p, flag in self._flags:
            p.requires_grad_(flag)


def _unchanged(value: Any, contents: Any) -> bool:
    """``value`` still holds exactly the recorded items (by identity): nothing to put back, which also leaves
    read-only mappings (diffusers' FrozenDict configs) alone."""
    if isinstance(value, dict):
        return value.keys() == contents.keys() and all(value[k] is contents[k] for k in contents)
    if isinstance(value, list):
        return len(value) == len(contents) and all(a is b for a, b in zip(value, contents))
    return {id(v) for v in value} == {id(v) for v in contents}


def _attrs(obj: Any) -> dict[str, tuple[Any, Any]]:
    return {k: (v, copy.copy(v) if isinstance(v, (dict, list, set)) else _NONE) for k, v in vars(obj).items()}


def _collect_configs(value: Any, out: dict[int, Any]) -> None:
    """``value`` and the dataclass objects (configs) inside it, by id."""
    if isinstance(value, (list, tuple, set)):
        for item in value:
            _collect_configs(item, out)
    elif isinstance(value, dict):
        for item in value.values():
            _collect_configs(item, out)
    elif hasattr(value, "__dataclass_fields__") and not isinstance(value, type) and id(value) not in out:
        out[id(value)] = value
        for item in vars(value).values():
            _collect_configs(item, out)
