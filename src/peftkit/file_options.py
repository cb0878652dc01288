"""What the options of a save or a load change in an adapter file (peft's semantics): the base model's
input embedding and output layer saved beside the adapter (``save_embedding_layers``: True, False or "auto"),
and the device, key renaming and GPU offload of a load (``torch_device``, ``key_mapping``,
``ephemeral_gpu_offload``). ``checkpoint.py`` reads and writes the files; this module decides what goes in."""

from __future__ import annotations

import os
import re
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from .config import PeftConfig
from .layers import AdapterLayer
from .tuner import ModulesToSaveWrapper, TunerModel

PREFIX = "base_model.model."
SHARED_PREFIX = "base_model."  # adapter-level shared tensors

# module paths that wrappers insert (FSDP1's ``FullyShardedDataParallel``, activation checkpointing's
# ``CheckpointWrapper``): file keys are those of the unwrapped model, as peft's (which strips FSDP's)
WRAPPER_PATHS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def unwrapped_keys(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The keys without the module paths FSDP1 / activation checkpointing insert."""
    if not any(w in k for k in tensors for w in WRAPPER_PATHS):
        return tensors
    out = {}
    for key, value in tensors.items():
        for w in WRAPPER_PATHS:
            key = key.replace(w, "")
        out[key] = value
    return out


def whole(t: Tensor) -> Tensor:
    """A sharded (FSDP2 DTensor) tensor gathered whole; any other tensor as it is."""
    full = getattr(t, "full_tensor", None)
    return full() if full is not None else t


def embedding_tensors(tuner: TunerModel, adapter_name: str, only_adapted: bool = False) -> dict[str, Tensor]:
    """File key -> base parameter of the model's input embedding and output layer (``get_input_embeddings`` /
    ``get_output_embeddings``, unwrapped from an adapter layer): the base tensors PEFT's
    ``save_embedding_layers`` writes, keyed as PEFT writes them (``...embed_tokens.weight``, or
    ``...embed_tokens.base_layer.weight`` when the embedding carries an adapter). ``only_adapted``: only the
    layers that carry an adapter over an ``nn.Linear`` / ``nn.Embedding`` (peft's rule when the config
    targets an embedding layer)."""
    model = tuner.model
    layers = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            layer = getattr(model, getter)()
        except (AttributeError, NotImplementedError, TypeError):
            continue
        if isinstance(layer, AdapterLayer):
            layer = layer.base_layer
            if only_adapted and not isinstance(layer, (nn.Linear, nn.Embedding)):
                continue
        elif only_adapted:
            continue
        elif isinstance(layer, ModulesToSaveWrapper):
            layer = layer.original_module
        if isinstance(layer, nn.Module):
            layers.append(layer)
    if not layers:
        return {}
    prefix = SHARED_PREFIX if tuner.peft_config[adapter_name].is_prompt_learning else PREFIX
    out = {}
    for path, module in model.named_modules():
        if path and any(module is layer for layer in layers):
            out.update({f"{prefix}{path}.{name}": p for name, p in module.named_parameters()})
    return unwrapped_keys(out)


EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")  # peft's


def saved_embeddings(tuner: TunerModel, adapter_name: str,
                     save_embedding_layers: bool | str = "auto") -> dict[str, Tensor]:
    """The base tensors PEFT's ``save_embedding_layers`` adds to an adapter's file (keys as
    ``embedding_tensors``; a load copies them back into the base model).

    True: the input embedding and output layer; when ``target_modules`` names an embedding layer, only those
    that carry an adapter (their ``base_layer``). False: none. ``"auto"`` (peft's rule): True when
    ``target_modules`` names an embedding layer (``embed_tokens`` / ``lm_head``) and the adapter does not
    train single tokens, or when ``model.config.vocab_size`` differs from the one in the base model's
    ``config.json`` (``base_model_name_or_path``: a local folder, or the Hub as peft asks it); else False."""
    if save_embedding_layers not in (True, False, "auto"):
        raise ValueError(f"save_embedding_layers: expected True, False or 'auto', got {save_embedding_layers!r}")
    config = tuner.peft_config[adapter_name]
    targets = getattr(config, "target_modules", None)
    if isinstance(targets, str) and targets != "all-linear":
        targeted = any(re.fullmatch(targets, name) for name, _ in tuner.model.named_modules()
                       if any(re.match(rf"(.*\.)?{e}$", name) for e in EMBEDDING_LAYER_NAMES))
    else:
        targeted = bool(targets) and not isinstance(targets, str) and any(e in targets for e in EMBEDDING_LAYER_NAMES)
    if save_embedding_layers == "auto":
        tokens = config.peft_type == "TRAINABLE_TOKENS" or getattr(config, "trainable_token_indices", None) is not None
        if targeted and not tokens:
            warnings.warn("Setting `save_embedding_layers` to `True` as embedding layers found in `target_modules`.",
                          stacklevel=3)
            save_embedding_layers = True
        else:
            save_embedding_layers = _vocab_resized(tuner.model, config)
    if not save_embedding_layers:
        return {}
    out = embedding_tensors(tuner, adapter_name, only_adapted=targeted)
    if not out and not callable(getattr(tuner.model, "get_input_embeddings", None)):
        warnings.warn("Could not identify embedding layer(s) because the model is not a 🤗 transformers model.",
                      stacklevel=3)
    return {k: whole(v.detach()) for k, v in out.items()}  # sharded (FSDP) ones gathered, as the adapter's


def _vocab_resized(model: nn.Module, config: PeftConfig) -> bool:
    """peft's "auto" test: the model's vocabulary size differs from its base model's saved config."""
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    model_id = getattr(config, "base_model_name_or_path", None)
    exists: bool | None = False
    if model_id:
        exists = os.path.exists(os.path.join(model_id, "config.json")) or _on_hub(model_id, "config.json")
        if exists is None:
            warnings.warn(f"Could not find a config file in {model_id} - will assume that the vocabulary was not "
                          "modified.", stacklevel=4)
    if vocab_size and model_id and exists and vocab_size != type(model.config).from_pretrained(model_id).vocab_size:
        warnings.warn("Setting `save_embedding_layers` to `True` as the embedding layer has been resized during "
                      "finetuning.", stacklevel=4)
        return True
    return False


def _on_hub(repo_id: str, filename: str) -> bool | None:
    """Whether the Hub has the file; None when that cannot be told (offline mode, an invalid id), as peft."""
    if os.environ.get("HF_HUB_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE"):
        return None
    from huggingface_hub import file_exists
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError

    try:
        return file_exists(repo_id, filename)
    except (HFValidationError, EntryNotFoundError):
        return None
    except Exception as err:  # noqa: BLE001 - peft: any failure of the lookup is a warning
        warnings.warn(f"Unable to fetch remote file due to the following error {err} - silently ignoring the lookup"
                      f" for the file {filename} in {repo_id}.", stacklevel=5)
        return None


def apply_load_options(state: dict[str, Tensor], source: str, config: PeftConfig, torch_device: Any = None,
                       key_mapping: dict[str, str] | None = None,
                       ephemeral_gpu_offload: bool = False) -> dict[str, Tensor]:
    """A file's tensors after peft's load options of ``PeftModel.from_pretrained`` / ``load_adapter``.

    ``torch_device``: the device the tensors are read onto before they are copied into the adapter, which
    stays next to its base layer (as peft; None: where the file reads, the CPU). ``key_mapping``: regex ->
    replacement applied to each key without its ``base_model.model.`` / ``base_model.`` prefix, the first
    pattern that matches wins (peft's ``load_peft_weights``). ``ephemeral_gpu_offload``: peft runs DoRA's
    initialisation on the GPU with it; a load here never computes that initialisation (the adapter's tensors
    come from the file), so there is nothing to move; without a CUDA / XPU device a DoRA adapter refuses it
    (peft fails there too), and a non-LoRA adapter warns as peft does."""
    if ephemeral_gpu_offload:
        if config.peft_type != "LORA":
            warnings.warn("Ephemeral GPU offloading is not supported for this model. Ignoring.", stacklevel=3)
        elif getattr(config, "use_dora", False) and not (
                torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())):
            raise ValueError("ephemeral_gpu_offload=True: it runs DoRA's initialisation on a CUDA or XPU device, "
                             "and none is available")
    if torch_device is not None:
        try:
            device = torch.device(torch_device)
            if device.type == "meta":
                raise ValueError("the meta device holds no values")
            state = {k: v.to(device) for k, v in state.items()}
        except (RuntimeError, AssertionError, ValueError, TypeError) as err:
            raise ValueError(f"torch_device={torch_device!r}: cannot load {source} onto it ({err})") from None
    return map_keys(state, key_mapping, source)


def map_keys(state: dict[str, Tensor], key_mapping: dict[str, str] | None, source: str) -> dict[str, Tensor]:
    """peft's ``key_mapping``: each regex -> replacement applied to the keys without their ``base_model.model.`` /
    ``base_model.`` prefix, the first pattern that matches winning."""
    if not key_mapping:
        return state
    if not isinstance(key_mapping, dict):
        raise TypeError(f"key_mapping: expected a dict of regex -> replacement, got {type(key_mapping).__name__}")
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        prefix = PREFIX if key.startswith(PREFIX) else SHARED_PREFIX
        if not key.startswith(prefix):
            raise ValueError(f"{source}: key {key!r} has no 'base_model.' prefix; cannot apply key_mapping")
        key = key.removeprefix(prefix)
        for pattern, replacement in key_mapping.items():
            key, n = re.subn(pattern, replacement, key)
            if n:
                break
        out[prefix + key] = value
    return out
