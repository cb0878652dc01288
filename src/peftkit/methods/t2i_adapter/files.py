"""T2I-Adapter in diffusers' own folder format: ``save_t2i_adapter`` writes a ``T2IAdapter`` folder
(``T2IAdapter.from_pretrained`` loads it), ``load_t2i_adapter`` adds one to a UNet as a peftkit adapter."""

from __future__ import annotations

from typing import Any

from torch import nn

from ...model import PeftModel, get_peft_model
from ..controlnet.side import side_adapter
from .config import T2IAdapterConfig
from .layer import T2IAdapterAdapter


def save_t2i_adapter(model: Any, folder: str, adapter_name: str = "default", **kwargs: Any) -> None:
    """Write adapter ``adapter_name``'s network as diffusers' ``T2IAdapter`` folder (``save_pretrained``; ``kwargs``
    go to it)."""
    side_adapter(model, adapter_name, T2IAdapterAdapter).net.save_pretrained(folder, **kwargs)


def load_t2i_adapter(model: nn.Module, folder: str, adapter_name: str = "default", conditioning_scale: float = 1.0,
                     blank_condition: float | None = None) -> PeftModel:
    """A diffusers ``T2IAdapter`` folder (``full_adapter``) as adapter ``adapter_name`` on ``model`` (a UNet, or a
    ``PeftModel`` over one); returns the ``PeftModel``. Its channels must be the UNet's block widths."""
    from diffusers import T2IAdapter

    net = T2IAdapter.from_pretrained(folder)
    cfg = net.config
    if cfg.adapter_type != "full_adapter":
        raise ValueError(f"{folder}: adapter_type {cfg.adapter_type!r}; peftkit's T2I-Adapter is diffusers' "
                         "'full_adapter'")
    config = T2IAdapterConfig(conditioning_channels=cfg.in_channels, downscale_factor=cfg.downscale_factor,
                              num_res_blocks=cfg.num_res_blocks, channels=list(cfg.channels),
                              conditioning_scale=conditioning_scale, blank_condition=blank_condition)
    if isinstance(model, PeftModel):
        model.add_adapter(adapter_name, config, low_cpu_mem_usage=True)
    else:
        model = get_peft_model(model, config, adapter_name=adapter_name, low_cpu_mem_usage=True)
    side_adapter(model, adapter_name, T2IAdapterAdapter).net.load_state_dict(net.state_dict())
    return model
