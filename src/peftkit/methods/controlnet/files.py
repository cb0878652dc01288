"""ControlNet in diffusers' own folder format: ``save_controlnet`` writes a ``ControlNetModel`` folder
(``ControlNetModel.from_pretrained`` loads it), ``load_controlnet`` adds one to a UNet as a peftkit adapter."""

from __future__ import annotations

from typing import Any

from torch import nn

from ...model import PeftModel, get_peft_model
from .config import ControlNetConfig
from .layer import ControlNetAdapter, jsonable
from .side import side_adapter


def save_controlnet(model: Any, folder: str, adapter_name: str = "default", **kwargs: Any) -> None:
    """Write adapter ``adapter_name``'s network as diffusers' ``ControlNetModel`` folder (``save_pretrained``;
    ``kwargs`` go to it)."""
    side_adapter(model, adapter_name, ControlNetAdapter).net.save_pretrained(folder, **kwargs)


def load_controlnet(model: nn.Module, folder: str, adapter_name: str = "default", conditioning_scale: float = 1.0,
                    blank_condition: float | None = None) -> PeftModel:
    """A diffusers ``ControlNetModel`` folder as adapter ``adapter_name`` on ``model`` (a UNet, or a ``PeftModel``
    over one); returns the ``PeftModel``. Its config must be the one ``from_unet`` gives for this UNet."""
    from diffusers import ControlNetModel

    net = ControlNetModel.from_pretrained(folder)
    cfg = net.config
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
