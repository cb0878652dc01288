"""ControlNet in diffusers' own folder format: ``save_controlnet`` writes a ``ControlNetModel`` folder (an
``SD3ControlNetModel`` one for an SD3 transformer; ``from_pretrained`` loads it), ``load_controlnet`` adds one to a
UNet / SD3 transformer as a peftkit adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from ...model import PeftModel, get_peft_model
from .config import ControlNetConfig
from .layer import SD3, ControlNetAdapter
from .side import backbone_of, jsonable, side_adapter


def save_controlnet(model: Any, folder: str, adapter_name: str = "default", **kwargs: Any) -> None:
    """Write adapter ``adapter_name``'s network as diffusers' ``ControlNetModel`` / ``SD3ControlNetModel`` folder
    (``save_pretrained``; ``kwargs`` go to it)."""
    side_adapter(model, adapter_name, ControlNetAdapter).net.save_pretrained(folder, **kwargs)


def load_controlnet(model: nn.Module, folder: str, adapter_name: str = "default", conditioning_scale: float = 1.0,
                    blank_condition: float | None = None) -> PeftModel:
    """A diffusers ``ControlNetModel`` folder as adapter ``adapter_name`` on ``model`` (a UNet, or a ``PeftModel``
    over one), or an ``SD3ControlNetModel`` folder on an SD3 transformer; returns the ``PeftModel``. Its config must
    be the one ``from_unet`` / ``from_transformer`` gives for this model."""
    from diffusers import ControlNetModel, SD3ControlNetModel

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    cls = SD3ControlNetModel if backbone_of(base) == SD3 else ControlNetModel
    config_file = Path(folder) / "config.json"
    saved_class = json.loads(config_file.read_text()).get("_class_name") if config_file.is_file() else None
    if saved_class not in (None, cls.__name__):
        raise ValueError(f"load_controlnet: {config_file} holds a {saved_class}; {type(base).__name__} takes a "
                         f"{cls.__name__}")
    net = cls.from_pretrained(folder)
    cfg = net.config
    if cls is SD3ControlNetModel:
        config = ControlNetConfig(
            num_layers=cfg.num_layers, extra_conditioning_channels=cfg.extra_conditioning_channels,
            force_zeros_for_pooled_projection=cfg.force_zeros_for_pooled_projection,
            conditioning_scale=conditioning_scale, blank_condition=blank_condition, controlnet_config=jsonable(cfg))
    else:
        config = ControlNetConfig(
            conditioning_channels=cfg.conditioning_channels,
            conditioning_embedding_out_channels=list(cfg.conditioning_embedding_out_channels),
            controlnet_conditioning_channel_order=cfg.controlnet_conditioning_channel_order,
            conditioning_scale=conditioning_scale, blank_condition=blank_condition, controlnet_config=jsonable(cfg))
    if isinstance(model, PeftModel):
        model.add_adapter(adapter_name, config, low_cpu_mem_usage=True)
    else:
        model = get_peft_model(model, config, adapter_name=adapter_name, low_cpu_mem_usage=True)
    side_adapter(model, adapter_name, ControlNetAdapter).net.load_state_dict(net.state_dict())
    return model
