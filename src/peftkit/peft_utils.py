"""peft's model and file utilities (``peft.utils``): the same names, signatures and results.

``load_peft_weights`` reads an adapter file; ``get_base_model_state_dict`` / ``set_base_model_state_dict``
read and write the base model's tensors under the model's own key names (no ``base_layer`` infixes, no
adapter tensors); ``cast_mixed_precision_params`` and ``shift_tokens_right`` are peft's helpers.
"""

from __future__ import annotations

import os
from collections import namedtuple
from typing import Any

import torch
from torch import nn

from . import checkpoint as ckpt
from .file_options import map_keys
from .layers import AdapterLayer
from .model import PeftModel
from .tuner import ModulesToSaveWrapper, TunerModel

__all__ = [
    "cast_mixed_precision_params", "get_base_model_state_dict", "load_peft_weights", "set_base_model_state_dict",
    "shift_tokens_right",
]

IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])


def shift_tokens_right(input_ids: torch.Tensor, pad_token_id: int, decoder_start_token_id: int) -> torch.Tensor:
    """Shift ``input_ids`` one token right, ``decoder_start_token_id`` first, -100 replaced by ``pad_token_id``."""
    shifted = input_ids.new_zeros(input_ids.shape)
    shifted[:, 1:] = input_ids[:, :-1].clone()
    shifted[:, 0] = decoder_start_token_id
    if pad_token_id is None:
        raise ValueError("self.model.config.pad_token_id has to be defined.")
    shifted.masked_fill_(shifted == -100, pad_token_id)
    return shifted


def cast_mixed_precision_params(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast frozen parameters to ``dtype`` (float16 / bfloat16) and trainable ones to float32, in place."""
    for p in model.parameters():
        p.data = p.to(dtype) if not p.requires_grad else p.to(torch.float32)


def _infer_device() -> str:
    """peft's default device for loaded weights: the accelerator when there is one, else the CPU."""
    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        return "mps"
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return "xpu"
    return "cpu"


def load_peft_weights(
    model_id: str | os.PathLike,
    device: str | None = None,
    key_mapping: dict[str, str] | None = None,
    **hf_hub_download_kwargs: Any,
) -> dict[str, torch.Tensor]:
    """The tensors of the adapter file in folder ``model_id`` (``subfolder`` kwarg honoured), on ``device``.

    Keys are the file's (``base_model.model.<path>.lora_A.weight``). ``key_mapping`` (regex -> replacement,
    the first pattern that matches wins) rewrites keys with the ``base_model.model.`` / ``base_model.`` prefix
    removed, as peft's. Local folders only: the other keyword arguments (hub download options) are ignored.
    """
    folder = os.fspath(model_id)
    if hf_hub_download_kwargs.get("subfolder") is not None:
        folder = os.path.join(folder, hf_hub_download_kwargs["subfolder"])
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: adapter folder not found (peftkit loads from local folders only)")
    state, _ = ckpt.read_weights(folder)
    device = _infer_device() if device is None else device
    if device != "cpu":
        state = {k: v.to(device) for k, v in state.items()}
    return map_keys(state, key_mapping, folder)


def _user_model(model: nn.Module) -> nn.Module:
    if isinstance(model, PeftModel):
        return model.get_base_model()
    if isinstance(model, TunerModel):
        return model.model
    raise TypeError(f"expected a PeftModel, got {type(model).__name__}")


def _original_key(root: nn.Module, key: str) -> str | None:
    """``key`` of ``root``'s state dict without wrapper infixes, or None for an adapter's own tensor.

    Walks the module tree (as peft does) so a module that happens to be called ``base_layer`` keeps its name:
    only the ``base_layer`` of an ``AdapterLayer`` and the ``original_module`` of a ``ModulesToSaveWrapper``
    are skipped; everything else inside those wrappers belongs to adapters.
    """
    out: list[str] = []
    current: nn.Module | None = root
    for part in key.split("."):
        if current is None:  # past the modules: a parameter or buffer name
            out.append(part)
        elif isinstance(current, AdapterLayer):
            if part != "base_layer":
                return None
            current = current.base_layer
        elif isinstance(current, ModulesToSaveWrapper):
            if part != "original_module":
                return None
            current = current.original_module
        else:
            out.append(part)
            current = current._modules.get(part)
    return ".".join(out)


def _key_map(model: nn.Module) -> tuple[nn.Module, dict[str, str]]:
    """(user's model, original key -> live key) for every base tensor."""
    root = _user_model(model)
    mapping: dict[str, str] = {}
    for key in root.state_dict(keep_vars=True):
        original = _original_key(root, key)
        if original is not None:
            mapping[original] = key
    return root, mapping


def get_base_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict under its original keys, without adapter tensors (merged weights if merged)."""
    root = _user_model(model)
    state = root.state_dict()
    return {original: state[live] for original, live in _key_map(model)[1].items()}


def set_base_model_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True) -> Any:
    """Load base-model tensors keyed by the original names into a wrapped model; adapters are untouched.

    Returns ``(missing_keys, unexpected_keys)``; with ``strict`` either being non-empty raises ``RuntimeError``
    and nothing is loaded.
    """
    root, mapping = _key_map(model)
    unexpected = [k for k in state_dict if k not in mapping]
    missing = [k for k in mapping if k not in state_dict]
    if strict and (missing or unexpected):
        msgs = []
        if missing:
            msgs.append(f"Missing key(s) in state_dict: {missing}")
        if unexpected:
            msgs.append(f"Unexpected key(s) in state_dict: {unexpected}")
        raise RuntimeError("Error(s) in loading state_dict:\n\t" + "\n\t".join(msgs))
    root.load_state_dict({mapping[k]: v for k, v in state_dict.items() if k in mapping}, strict=False)
    return IncompatibleKeys(missing_keys=missing, unexpected_keys=unexpected)
