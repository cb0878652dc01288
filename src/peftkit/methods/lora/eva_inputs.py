"""EVA's calibration inputs (``eva.py``): peft's helpers that put a batch on the model's device and pick what
each adapted layer's PCA sees (padding and, with ``use_label_mask``, unlabeled positions left out)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn


# -- inputs ------------------------------------------------------------------------------------------------
def get_device_with_meta_params(model: nn.Module) -> Optional[torch.device]:
    devices = list({p.device for p in model.parameters() if p.device.type != "meta"})
    if len(devices) > 1:
        warnings.warn(f"Could not determine device, model has multiple devices: {devices}", stacklevel=2)
        return None
    return devices[0]


def move_inputs_to_device(inputs: Any, device: Union[str, torch.device]) -> Any:
    if hasattr(inputs, "to"):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return type(inputs)({k: move_inputs_to_device(v, device) for k, v in inputs.items()})
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(move_inputs_to_device(v, device) for v in inputs)
    warnings.warn(f"input of type {type(inputs)} could not be moved to the correct device", stacklevel=2)
    return inputs


def prepare_model_inputs_fn_language_modeling(model_input: Any, peft_config: Any) -> Tensor:
    """Indices (batch, position) of the items to use: the attention mask, and labels != ``label_mask_value``
    with ``use_label_mask``."""
    if not isinstance(model_input, dict):
        raise TypeError("When using `prepare_model_inputs_fn_language_modeling` inputs must be a dictionary")
    mask = model_input.get("attention_mask", torch.ones_like(model_input["input_ids"])).bool()
    if peft_config.eva_config.use_label_mask and ("labels" in model_input):
        mask = torch.logical_and(mask, model_input["labels"] != peft_config.eva_config.label_mask_value)
    return mask.nonzero()


def prepare_layer_inputs_fn_language_modeling(layer_input: Any, model_input: Tensor, layer_name: str) -> Tensor:
    """The layer input's items at the indices ``prepare_model_inputs_fn_language_modeling`` chose."""
    if isinstance(layer_input, (tuple, list)):
        layer_input = layer_input[0]
    elif not isinstance(layer_input, Tensor):
        raise TypeError(f"unsupported input type {type(layer_input)} for prepare_layer_inputs_fn in layer "
                        f"{layer_name}, please provide a custom prepare_layer_inputs_fn")
    return layer_input[model_input.T.unbind()]


def forward_fn_dict(model: nn.Module, inputs: dict) -> Any:
    return model(**inputs)
